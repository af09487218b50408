"""The embedded demo model: a small class-conditional DiT that draws digits 0-9, and a digit classifier.

Everything here is generated and trained by the project itself (``python -m svdq_compile.demo.train``),
so the 4-bit pipeline can be shown and scored without any model hub.

Example:
    >>> from svdq_compile.demo.digits import render_digits
    >>> render_digits([3, 7], seed=0).shape
    torch.Size([2, 1, 32, 32])
"""
