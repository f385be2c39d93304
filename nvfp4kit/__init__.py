"""nvfp4kit: DeepSeek V4 FP8 block-scaled checkpoints -> NVFP4 for vLLM.

Modules, one concept each: ``fp8`` (source block decoding), ``nvfp4`` (the format), ``safetensors_io`` (files),
``checkpoint`` (index + headers), ``rules`` (what each tensor is), ``layouts`` (output formats and configs),
``plan`` (what Path A will do), ``convert`` (Path A itself, a package), ``write`` (the shard writer both paths use),
``fixtures`` (the synthetic test checkpoints). docs/design.md lists every module.
"""

__version__ = "0.1.0"
