"""Hedlin et al.'s training-free matcher (NeurIPS 2023): optimise a prompt embedding per source point so that
the UNet's cross-attention peaks there, then read the peak of its attention on the target image.

Three layers:

* **Capture.** `capture_cross_attention(unet, layers)` installs `CrossAttentionCapture` processors on chosen
  cross-attention layers (``attn2`` of the transformer blocks) and restores the original processors on exit.
  The processor computes softmax(Q K^T * scale) explicitly, so the probabilities can be stored and
  differentiated (gradients reach the encoder hidden states), and computes the layer output from them
  exactly as diffusers' default processors do. Self-attention layers are never touched.
* **Layers.** `cross_attention_layers` lists every ``attn2`` with its spatial resolution for an input size;
  `hedlin_layers` is the paper's choice ("the up-block layers at 16 x 16 and the first at 32 x 32" for a
  512 px input), expressed relative to the latent (1/4 and 1/2 of its side) so small models get the
  analogous layers.
* **Matcher.** `AttentionMatcher(sd, AttentionMatcherConfig())`: `optimize_embeddings` (source),
  `attention_maps` (any image), `match` (both, pixels in, pixels out).

Coordinates: (x, y) pixels. Images are resized to ``config.image_size`` (aspect ratio not kept) and points
scaled per axis, as everywhere in `sdm`.

By default (``geometry="authors"``, ``readout="authors"``) the matcher computes what Hedlin et al.'s code
computes (github ubc-vision/LDM_correspondences at 97e3246; file:line in docs/choices.md): integer-offset
crops of int(side x crop_frac) px placed by a margin rule, maps upsampled without align corners, the four
corner crops then crops around the running argmax at inference, a softmax per layer before the mean, and the
argmax pixel + 0.5 as the match.

``geometry="continuous"`` keeps sdm 0.2's own geometry: attention maps upsampled with bilinear interpolation
under the align-corners convention (cell 0 <-> pixel 0, last cell <-> last pixel), and crops described in
normalised align-corners coordinates p = x / (W - 1) in [0, 1]: a crop with
offset o and scale s shows the full-image position p = o + q * s at its own position q in [0, 1]
(s = crop side / image side, the same on both axes). This makes crop <-> image mapping resolution-free.

Reading of the paper's settings (all in `AttentionMatcherConfig`, all configurable):

* "Gaussian of 28 px" is read as the standard deviation of the target, exp(-d^2 / (2 sigma^2)) with peak 1,
  at a 512 px input; `sigma` is stored relative to the image side (28 / 512), measured in the model-input
  frame of a crop (the crop is resized to the full input size before the UNet sees it).
* The target is compared with the attention probability of the chosen token as it is (mean over heads
  and layers, values in [0, 1]); a Gaussian with peak 1 then asks the token to win the softmax over the
  77 tokens at the query and to lose it far from it. ``normalize="minmax"`` rescales each map to [0, 1]
  first (only the shape of the map matters then).
"""

from sdm.attention import capture, crops, geometry, layers, matcher
from sdm.attention.capture import *  # noqa: F403  (each module's __all__, handed on)
from sdm.attention.crops import *  # noqa: F403
from sdm.attention.geometry import *  # noqa: F403
from sdm.attention.layers import *  # noqa: F403
from sdm.attention.matcher import *  # noqa: F403
from sdm.config import HEDLIN_MODEL, AttentionMatcherConfig

__all__ = ["HEDLIN_MODEL", "AttentionMatcherConfig", *layers.__all__, *capture.__all__, *geometry.__all__, *crops.__all__, *matcher.__all__]
