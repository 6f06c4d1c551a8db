"""DETR for COCO detection, with its loss split for GAL (see detr.py's docstring), in DETR's own files:
detr.py (model, criterion, post-processing), matcher.py, transformer.py, backbone.py, position_encoding.py,
box_ops.py. Import from those modules: importing the package runs none of them (the precision study reads
box_ops.py alone)."""
