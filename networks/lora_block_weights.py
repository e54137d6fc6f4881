"""`--lbws`: per-block weights for LoRA merging (spec lora-format.md §10).

One JSON list per model over the 26-slot layout `BASE, IN00-IN11, MID, OUT00-OUT11` (BASE = the
text encoders). The list's length names a layout: 26 (SD, all slots), 17 (SD attention blocks:
BASE, IN01/02/04/05/07/08, MID, OUT03-11), 20 (SDXL: BASE, IN00-08, MID, OUT00-08) or 12 (SDXL
attention blocks: BASE, IN04/05/07/08, MID, OUT00-05); slots not listed weigh 1. The layout must
suit the LoRA's family (sd-scripts picks it by length alone, so an SDXL LoRA given an SD list got no
U-Net weighting). A weight multiplies the module's change once (linear), in every merge mode.
"""

from __future__ import annotations

import json
from typing import Callable, List, Optional

from library.errors import UserError
from networks.lora_names import block_index

BASE, MID, OUT0 = 0, 13, 14
LAYOUTS = {
    26: (False, list(range(26))),
    17: (False, [0, 2, 3, 5, 6, 8, 9, MID] + list(range(OUT0 + 3, OUT0 + 12))),
    20: (True, [0] + list(range(1, 10)) + [MID] + list(range(OUT0, OUT0 + 9))),
    12: (True, [0, 5, 6, 8, 9, MID] + list(range(OUT0, OUT0 + 6))),
}


def slot_of(lora_name: str, is_sdxl: bool) -> Optional[int]:
    """The slot of a module name, None for U-Net modules outside the blocks (conv_in, time embedding)."""
    if lora_name.startswith("lora_te"):
        return BASE
    index = block_index(lora_name, is_sdxl)
    if is_sdxl and index < 0 and lora_name.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_",
                                                      "lora_unet_up_blocks_")):
        index = block_index(lora_name, False)  # a diffusers-named SDXL file: same slots as SD's names
        is_sdxl = False
    if index < 0:
        return None
    if is_sdxl:
        if index in (0, 22):  # time/label embeddings and the output layers: no block
            return None
        if 10 <= index <= 12:
            return MID
        return index if index < 10 else index + 1
    return index + 1


def parse(text: str, is_sdxl: bool, source: str) -> List[float]:
    """The 26 slot weights from one `--lbws` JSON list."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"--lbws {text!r} ({source}): not a JSON list like [1,0.5,...]") from None
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise UserError(f"--lbws {text!r} ({source}): expected a JSON list of numbers")
    if len(values) not in LAYOUTS:
        raise UserError(f"--lbws ({source}): {len(values)} values; use 12 or 20 (SDXL) or 17 or 26 (SD1/SD2)")
    sdxl_layout, slots = LAYOUTS[len(values)]
    if sdxl_layout != is_sdxl:
        raise UserError(f"--lbws ({source}): a list of {len(values)} is for {'SDXL' if sdxl_layout else 'SD1/SD2'} "
                        f"LoRAs, this one is {'SDXL' if is_sdxl else 'SD1/SD2'}")
    weights = [1.0] * 26
    for slot, value in zip(slots, values):
        weights[slot] = float(value)
    return weights


def module_weight(text: Optional[str], is_sdxl: bool, source: str) -> Optional[Callable[[str], float]]:
    """name -> weight for one model's `--lbws` list (None when no list is given)."""
    if not text:
        return None
    weights = parse(text, is_sdxl, source)

    def weight(lora_name: str) -> float:
        slot = slot_of(lora_name, is_sdxl)
        return 1.0 if slot is None else weights[slot]

    return weight
