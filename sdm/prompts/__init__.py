"""Prompts for the UNet: zero-shot (empty, template, implicit captioner) and learned (Single, Class, CPM).

Every prompt is a `PromptModule` chosen by name from `PROMPTS`. Its `conditioning` says what it depends on,
which decides how features can be cached during evaluation:

- "fixed":    the same prompt for every image (empty, Single)
- "category": one prompt per category (template, Class)
- "image":    computed from the image itself (implicit captioner, CPM conditioned on each image alone)
- "pair":     computed from both images of a pair (CPM), so features are per pair

A prompt is anything `SDFeaturizer.encode_prompt` accepts: strings, learned vectors B x N x D (N <= 75) or
encoder hidden states B x 77 x D. docs/specification.md ("Prompt assembly", "CPM") is the specification; docs/choices.md
lists where sdm offers another reading than the authors' code (github ActiveVisionLab/SD4Match, 3d7b09e).
"""

from sdm.config import CPM_ABLATIONS, LEARNED, CPMConfig
from sdm.prompts.base import (
    PROMPTS,
    TEMPLATE,
    BuildOptions,
    Conditioning,
    Originals,
    PromptModule,
    StoredImages,
    build_prompt,
    category_text,
    originals_for,
    register_prompt,
    seeded_linear,
)

# Each module registers its kinds on import: this order is PROMPTS' (and config.PROMPT_KINDS') order.
# isort: off
from sdm.prompts.zero_shot import EmptyPrompt, ImplicitCaptioner, TemplatePrompt
from sdm.prompts.learned import ClassPrompt, SinglePrompt, learned_vectors, random_token_vectors
from sdm.prompts.cpm import CPMPrompt, DinoDescriptor
# isort: on

__all__ = [  # CPM_ABLATIONS, CPMConfig and LEARNED (sdm.config) are re-exported: build_prompt takes them
    "CPM_ABLATIONS",
    "LEARNED",
    "PROMPTS",
    "TEMPLATE",
    "BuildOptions",
    "CPMConfig",
    "CPMPrompt",
    "ClassPrompt",
    "Conditioning",
    "DinoDescriptor",
    "EmptyPrompt",
    "ImplicitCaptioner",
    "Originals",
    "PromptModule",
    "SinglePrompt",
    "StoredImages",
    "TemplatePrompt",
    "build_prompt",
    "category_text",
    "learned_vectors",
    "originals_for",
    "random_token_vectors",
    "register_prompt",
    "seeded_linear",
]
