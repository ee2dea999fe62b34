from pathlib import Path

from setuptools import find_packages, setup

version = next(line.split('"')[1] for line in Path("gradcam_cli/__init__.py").read_text().splitlines()
               if line.startswith("__version__"))

setup(
    name="gradcam",
    version=version,
    description="Explain vision networks: gradient maps and the Grad-CAM family for torchvision, timm, "
                "Hugging Face and your own models",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["gradcam_cli", "gradcam_cli.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.0",
        "torchvision>=0.15",
        "click>=8.2",
        "matplotlib>=3.5",
        "tqdm>=4.60",
        "pillow>=9.1",
        "numpy>=1.22",
        "opencv-python-headless>=4.5",  # --video: frames read and written with OpenCV
    ],
    extras_require={
        "safetensors": ["safetensors>=0.3"],
        "timm": ["timm>=1.0"],          # --arch timm/NAME
        "hf": ["transformers>=5.0"],    # --arch hf/PATH_OR_ID
        "ray": ["ray[data]>=2.40"],     # --ray: batches on a Ray cluster (gradcam_cli.cluster)
        # torchcam pinned: tests/test_methods_torchcam.py reproduces 0.5.0's own conventions;
        # 0.5.0 needs Python >= 3.11, so .ci/lowest-python (3.10) runs every test file but that one
        "test": ["pytest>=7", "captum>=0.7", "grad-cam>=1.5", "torchcam==0.5.0; python_version >= '3.11'",
                 "safetensors>=0.3", "timm>=1.0", "transformers>=5.0", "ray[data]>=2.40",
                 "scipy>=1.8", "ruff>=0.4"],
        "bench": ["captum>=0.7", "grad-cam>=1.5", "torchcam>=0.4"],
    },
    entry_points={"console_scripts": ["gradcam=gradcam_cli.cli:main"]},
)
