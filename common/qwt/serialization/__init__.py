"""Save and load a quantised, compensated model: ``model.safetensors`` + ``qwt.json``.

The tensors hold everything that calibration and fitting produced (reparameterised weights, quantiser Δ/z,
compensation W/b); the JSON says how to rebuild the module structure around them: registry name and builder
arguments, the PTQ config the model was quantised with, every quantiser's kind, bit width and declared settings
(grid, axis, log floor, group size) as read from the model itself, which blocks carry which compensation (a dense
wrapper, or channel-wise corrections: a gain and a shift after a residual branch's last layer, its kind and width
stated), and the SHA-256 of every tensor's bytes. The SHA-256 of the JSON is stored in the tensor file.

What the checks guarantee, and what they do not:

- The checksums detect accidental damage (a truncated file, a flipped bit) and an edit or swap of either file
  alone. They do not detect a deliberate, consistent rewrite: whoever rewrites the tensors and the description
  can recompute every checksum.
- The value checks refuse what the format cannot mean, however consistently written: a config other than the
  one the model was quantised with (on save) or than the quantisers' settings; tensors of the wrong dtype or
  shape or with NaN/Inf; Δ ≤ 0; zero points off their grid or beyond what calibration can produce; GPTQ codes off
  the grid; weight grids that do not reach their weights; FP16-evaluated compensation beyond FP16's range;
  negative channel-wise gains; a channel-wise correction after a layer of another kind or width;
  builder arguments the registered model does not take (its entry's ``check_saved_args``). Values that are
  possible but wrong (a zero point or a compensation weight calibration could have produced, an argument that
  keeps every tensor's shape such as a language model's rotary base, a compensation moved to another module of
  the same kind and width) cannot be told from genuine ones.
- Loading never runs code from the files (nothing is unpickled; the description names a registered builder) and
  bounds what it allocates: the description's size, nesting and builder arguments (nested configs included) are
  bounded, and the structure is first built on the ``meta`` device, before any memory is allocated for it. A
  saved model from an untrusted source is data, not code, but its numbers are only as trustworthy as its source.

Saving writes a fresh temporary folder and renames it into place; it replaces only a previous save that holds
nothing else, and never deletes a file it did not write.

One module per job: :mod:`.describe` (model → description), :mod:`.bounds` (what a description may declare),
:mod:`.skeleton` (description → module structure), :mod:`.verify` and :mod:`.values` (description ↔ config ↔
tensors), :mod:`.store` (the files on disk), :mod:`.api` (save and load, composing them).
"""
from .api import load_quantized, save_quantized
from .bounds import (BUILD_LIMITS, FORBIDDEN_BUILD_ARGS, MAX_BUILD_ITEMS, MAX_BUILD_NUMBER, MAX_CONFIG_ITEMS,
                     MAX_DESCRIPTION_BYTES, MAX_NESTING, saved_build_problems)
from .describe import FORMAT_VERSION, tensor_sha256
from .store import DESCRIPTION, HASH_KEY, TENSORS, check_save_target

__all__ = ["BUILD_LIMITS", "DESCRIPTION", "FORBIDDEN_BUILD_ARGS", "FORMAT_VERSION", "HASH_KEY", "MAX_BUILD_ITEMS",
           "MAX_BUILD_NUMBER", "MAX_CONFIG_ITEMS", "MAX_DESCRIPTION_BYTES", "MAX_NESTING", "TENSORS",
           "check_save_target", "load_quantized", "save_quantized", "saved_build_problems", "tensor_sha256"]
