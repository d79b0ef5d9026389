"""triton: the interpreter's bfloat16 dot (tests and the GPU script's CPU dry run only; never at import).

triton's interpreter (``TRITON_INTERPRET=1``) keeps bfloat16 as raw uint16 bits and its ``tl.dot``
multiplies those bits (seen with triton 3.8; no public hook exists); :func:`patch_interpreter_bfloat16_dot`
widens bfloat16 operands to float32 first, which is what the tensor cores compute (exact bf16 products,
float32 accumulation). Compiled kernels on a GPU are not affected.
"""

from __future__ import annotations

from .versions import require_tested

_PATCHED = False


def patch_interpreter_bfloat16_dot() -> None:
    """Make the interpreter's ``tl.dot`` exact for bfloat16 operands (idempotent)."""
    global _PATCHED
    if _PATCHED:
        return
    require_tested("triton", "3.0", "3.9", "the triton interpreter's bfloat16 dot patch")
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, *args):
        widened = []
        for x in (a, b):
            if x.dtype.scalar == interpreter.tl.bfloat16:
                data = interpreter._convert_float(x.data, x.dtype.scalar, interpreter.tl.float32, None)
                x = interpreter.TensorHandle(data.view(np.float32), interpreter.tl.float32)
            widened.append(x)
        return original(self, *widened, *args)

    interpreter.InterpreterBuilder.create_dot = create_dot
    _PATCHED = True
