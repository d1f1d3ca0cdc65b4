"""minalign: self-alignment (rejection sampling, iterative DPO) for Mistral/Mixtral in plain PyTorch."""
from setuptools import find_packages, setup

setup(
    name="minalign",
    version="0.1.0",
    description="Readable from-scratch self-alignment for Mistral and Mixtral models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["minalign", "minalign.*", "kernels", "kernels.*"]),
    install_requires=[
        # torch is deliberately unpinned: install the build you want (CPU or CUDA) first;
        # any torch >= 2.5 then satisfies this and pip pulls nothing more. triton is not listed: CUDA builds of
        # torch ship it (the fused kernel's only home), and a CPU install would pull ~1 GB it never runs.
        "torch>=2.5",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "numpy",
        "einops",
        "matplotlib",  # summary.png of the alignment loop (imported only when the plot is drawn)
    ],
    extras_require={
        # transformers is a test oracle only: the product never imports it.
        # triton: the kernel tests run it on the CPU under TRITON_INTERPRET=1.
        # mistral-common: the oracle of the mistral template's ids (it ships Mistral's v1 tokenizer.model).
        # trl: the oracle of the SimPO loss (its CPO trainer's).
        "test": ["pytest", "transformers>=4.45", "protobuf", "triton; platform_system == 'Linux'",
                 "mistral-common>=1.13", "trl>=0.19"],
    },
)
