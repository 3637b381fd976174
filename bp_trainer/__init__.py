"""BP Train core: bucketed Stable Diffusion 1.x fine-tuning, tokenizer inspection and checkpoint tools.

This package never imports the WebUI (`modules.*`) and never imports diffusers/accelerate at module
level in code that the WebUI process loads: see README "Architecture".
"""

__version__ = "0.1.0"
