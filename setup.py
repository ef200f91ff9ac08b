"""Packaging for cdrl_diffusers: Cooperative Diffusion Recovery Likelihood EBMs for the diffusers ecosystem."""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "src/cdrl_diffusers/__init__.py").read_text()).group(1)

install_requires = [
    "torch>=2.1",
    "diffusers>=0.42.1,<0.43",
    "accelerate>=0.30",
    "datasets>=2.19",
    "safetensors>=0.4",
    "huggingface-hub>=0.23",
    "numpy>=1.24",
    "Pillow>=9.0",
    "tqdm>=4.60",
    # evaluation: FID/KID (float features are kept from 1.3 on with normalize=False), ROC AUC, the bundled digits
    "torchmetrics>=1.3",
    "scikit-learn>=1.3",
    "scipy>=1.10",
]
examples_requires = ["tensorboard>=2.12", "matplotlib>=3.7"]
# pretrained feature backbones for evaluation (DINOv2 and any other `AutoModel` vision model): TransformersFeatures
backbones_requires = ["transformers>=4.40"]
test_requires = ["pytest>=7.4"] + examples_requires + backbones_requires
docs_requires = ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.25"]

setup(
    name="cdrl_diffusers",
    version=version,
    description="Energy-based models trained by Cooperative Diffusion Recovery Likelihood (CDRL), the diffusers way.",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.11",  # as diffusers 0.42
    install_requires=install_requires,
    entry_points={"console_scripts": ["cdrl-diffusers = cdrl_diffusers.cli:main"]},
    extras_require={
        "examples": examples_requires,
        "backbones": backbones_requires,
        "test": test_requires,
        "docs": docs_requires,
        "dev": test_requires + docs_requires + ["ruff>=0.4"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "License :: OSI Approved :: Apache Software License",
    ],
)
