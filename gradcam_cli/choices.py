"""The fixed choices the command line offers, in a module that imports nothing heavy, so that
`gradcam --help` answers without loading torch."""

BASELINES = ("blur", "mean", "zero")  # what evaluate's removed pixels become
PROXY_KINDS = ("mean", "single")      # how embed turns a class's exemplars into a proxy
SIMILARITIES = ("dot", "cosine")      # the score embed explains
RESIZES = ("shorter", "squash", "none")          # how an image is brought to the input size
CROPS = ("center", "none")                       # what is cut from the resized image
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
OCCLUSION_FILLS = ("zero", "mean", "blur")       # what an occlusion patch becomes
OCCLUSION_BORDERS = ("edge", "pad")              # captum's windows, or seed 001's padding
IG_BASELINES = ("black", "blur", "mean")         # Integrated Gradients' path start
IG_RULES = ("gausslegendre", "riemann-trapezoid")  # captum's gausslegendre and riemann_trapezoid
SMOOTH_TYPES = ("smoothgrad", "smoothgrad-sq", "vargrad")  # captum NoiseTunnel's nt_type
CAM_FUSIONS = ("mean", "max")                    # how classify fuses several layers' CAMs
PRECISIONS = ("fp32", "bf16", "fp16")            # of the explained forward passes (fp16: CUDA)
