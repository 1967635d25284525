"""The LADDER method as pure PyTorch stages over tensors: no files, HTTP or database here.

Stages (method.md): latents → boundary → generator → adversarial → finetune → evaluate.
"""
