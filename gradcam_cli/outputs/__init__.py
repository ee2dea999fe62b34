"""What a run writes besides the grid: raw maps (``maps``), overlays on the original photo
(``overlay``); the choices are here, importable without torch, for the command line."""

SAVE_MAPS = ("none", "npy", "npz")  # raw maps: not written, a .npy per class and method, a .npz per image
OVERLAYS = ("crop", "original")     # CAM files drawn over the model's crop or over the original photo
