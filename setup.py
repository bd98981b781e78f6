from setuptools import find_packages, setup


setup(
    name="bitdance-diffusers",
    version="0.1.0",
    description="BitDance (binary-token autoregressive image generation) as native Hugging Face diffusers pipelines",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    # The shapes demo model (the offline default of `bitdance generate`) and the ImageNet-1k label names ship inside
    # the package.
    package_data={"bitdance_diffusers": ["pretrained/*/*.json", "pretrained/*/*/*", "conversion/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.42",
        "transformers>=4.57",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface_hub>=0.34",
        "pillow>=10.0",
        "tqdm>=4.66",
        "numpy>=1.26",
    ],
    extras_require={
        # torchao: tested 0.17, 0.18; peft: tested 0.21; gradio: tested 6.31; selenium: tested 4.51 (it drives the
        # system's chromium for the demo's browser tests: apt-get install chromium chromium-driver)
        "test": ["pytest>=8.0", "torchao>=0.17,<0.19", "bitsandbytes>=0.48", "peft>=0.15", "gradio>=6.0,<7",
                 "selenium>=4.20", "datasets>=3.0", "tensorboard>=2.15"],
        "demo": ["gradio>=6.0,<7"],
        "quantization": ["torchao>=0.17", "bitsandbytes>=0.45"],
        "lora": ["peft>=0.15"],
        # The training examples: datasets (image folders, Hub datasets), TensorBoard logs, LoRA; tested: datasets 5.2.
        "training": ["datasets>=3.0", "tensorboard>=2.15", "peft>=0.15"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["bitdance=bitdance_diffusers.cli:main"]},
)
