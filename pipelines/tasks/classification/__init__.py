"""Image classification: a timm model on CIFAR-10/100 or ImageNet (task.py) and its data (data.py)."""
