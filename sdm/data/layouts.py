"""The official folder layouts of the benchmarks, as the error messages and `sdm download` show them (plain text:
importable without torch)."""

SPAIR_LAYOUT = """\
<root>/                                   (the extracted SPair-71k/ folder)
  JPEGImages/<category>/<image>.jpg
  PairAnnotation/{trn,val,test}/<pair>.json
  Layout/large/{trn,val,test}.txt         one <pair> name per line, e.g. 000001-2008_000585-2008_004704:aeroplane
  ImageAnnotation/<category>/<image>.json (only for the geometry-aware subset: each image's visible keypoints)
"""


PFPASCAL_LAYOUT = """\
<root>/
  {trn,val,test}_pairs.csv            source_image,target_image,class[,flip][,XA,YA,XB,YB]
  PF-dataset-PASCAL/JPEGImages/<image>.jpg
  PF-dataset-PASCAL/Annotations/<category>/<image>.mat   fields kps (N x 2, x y, NaN = absent), bbox (1 x 4)
"""


PFWILLOW_LAYOUT = """\
<root>/
  test_pairs.csv                 imageA,imageB,XA1..XA10,YA1..YA10,XB1..XB10,YB1..YB10
  PF-dataset/<class>/<name>.png  e.g. PF-dataset/car(G)/Cars_006a.png (csv paths say PF-WILLOW/...)
"""


CUB_LAYOUT = """\
<root>/                                  (the extracted CUB_200_2011/ folder)
  images.txt                             <image id> <class folder>/<file>.jpg
  train_test_split.txt                   <image id> <1: training, 0: test>
  image_class_labels.txt                 <image id> <class id, 1..200>
  bounding_boxes.txt                     <image id> <x> <y> <width> <height>
  parts/part_locs.txt                    <image id> <part id> <x> <y> <visible>
  images/<class folder>/<file>.jpg
"""

__all__ = ["CUB_LAYOUT", "PFPASCAL_LAYOUT", "PFWILLOW_LAYOUT", "SPAIR_LAYOUT"]
