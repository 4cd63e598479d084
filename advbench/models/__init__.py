"""Models: the reference zoo and loaders for saved files, import paths, torchvision, timm, robustbench."""
