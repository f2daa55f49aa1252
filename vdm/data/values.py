"""Integer-coded data: its vocabulary (values per sub-pixel), the dtype it travels in, and the
reduction to fewer bits.

The model sees discrete data as integers in [0, V) for a vocabulary V (256 for 8-bit images,
17 for the digits). Data read from a user's files is checked here once, with errors that name
the file and the problem, so a wrong array fails before the first step rather than as a
silently wrong likelihood.
"""

import numpy as np

EIGHT_BIT = 256


def code_dtype(vocab_size: int) -> np.dtype:
    """The dtype integer data of this vocabulary travels in: uint8 up to 256 values, else int32."""
    return np.dtype(np.uint8) if vocab_size <= EIGHT_BIT else np.dtype(np.int32)


def integer_codes(x: np.ndarray, vocab_size: int, where: str) -> tuple[np.ndarray, int]:
    """Checks integer-coded data and returns it in its travel dtype with its vocabulary.

    Args:
      x: the data, any shape.
      vocab_size: the declared vocabulary (data.vocab_size); 0 infers it: 2 for booleans and
        256 for every integer dtype (8-bit values), so data with another range must say so.
      where: what x is, for error messages (e.g. "array 'train' of data.npz").

    Returns:
      (x as code_dtype(V), V).

    Raises:
      ValueError: a negative vocab_size, an unsupported dtype, floats without vocab_size or
        with non-integer values, or values outside [0, V).
    """
    if vocab_size < 0:
        raise ValueError(f"data.vocab_size={vocab_size} must be >= 0 (0 infers it).")
    kind = x.dtype.kind
    if kind == "b":
        x, natural = x.astype(np.uint8), 2
    elif kind in "ui":
        natural = EIGHT_BIT
    elif kind == "f":
        if not vocab_size:
            raise ValueError(
                f"{where} has dtype {x.dtype}, not integers: this model needs integer-coded "
                "data. Store integers (e.g. uint8 for 8-bit images), or, if the floats hold "
                "integer values, set data.vocab_size to the number of values per sub-pixel."
            )
        if not np.all(np.isfinite(x)) or np.any(x != np.round(x)):
            bad = x[~np.isfinite(x) | (x != np.round(x))].ravel()[:3]
            raise ValueError(
                f"{where} has non-integer values (e.g. {', '.join(f'{v:g}' for v in bad)}); "
                f"data.vocab_size={vocab_size} needs integer values in [0, {vocab_size})."
            )
        natural = None
    else:
        raise ValueError(
            f"{where} has dtype {x.dtype}; expected integers (uint8 for 8-bit images) or "
            "floats holding integers together with data.vocab_size."
        )
    vocab = int(vocab_size or natural)
    if x.size:
        lo, hi = x.min(), x.max()
        if lo < 0 or hi >= vocab:
            hint = (
                f"set data.vocab_size to the number of values per sub-pixel (at least {hi + 1})"
                if not vocab_size and hi >= vocab
                else "values must lie in [0, vocab_size)"
            )
            source = "data.vocab_size" if vocab_size else f"inferred from dtype {x.dtype}"
            raise ValueError(
                f"{where} has values outside [0, {vocab}) ({source}): min {lo:g}, max {hi:g}; "
                f"{hint}."
            )
    return x.astype(code_dtype(vocab)), vocab


def bit_shift(vocab_size: int | None, num_bits: int, name: str) -> int:
    """How far to shift values right to keep their top `num_bits` bits (data.num_bits).

    Args:
      vocab_size: the data's vocabulary; must be a power of two (None: continuous data).
      num_bits: bits to keep per sub-pixel; 0 keeps the data as it is.
      name: the dataset's data.name, for errors.

    Returns:
      log2(vocab_size) - num_bits (0 when num_bits is 0); the new vocabulary is 2^num_bits.
    """
    if num_bits == 0:
        return 0
    if vocab_size is None or vocab_size & (vocab_size - 1):
        raise ValueError(
            f"data.num_bits={num_bits} reduces data whose vocabulary is a power of two (256 for "
            f"8-bit images); data.name={name!r} has vocab_size {vocab_size}."
        )
    bits = vocab_size.bit_length() - 1
    if not 1 <= num_bits <= bits:
        raise ValueError(
            f"data.num_bits={num_bits} must be between 1 and {bits} for data.name={name!r} "
            f"({bits}-bit values; 0 keeps them as they are)."
        )
    return bits - num_bits
