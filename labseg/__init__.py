"""labseg: binary pet segmentation on Oxford-IIIT Pet with UNet and ResNet34-UNet, from scratch."""
__version__ = "0.1.0"
