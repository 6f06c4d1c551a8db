"""Object detection: DETR on COCO 2017 (task.py), its data (data.py) and the detector (detr/)."""
