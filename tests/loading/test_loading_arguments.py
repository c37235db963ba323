"""from_pretrained's arguments: TransformerLens's names where they mean something, a clear error where not."""

import pytest
import torch

from vlm_lens import HookedVLM


def test_torch_dtype_is_the_old_name_of_dtype(llava_dir):
    with pytest.warns(DeprecationWarning, match="old name"):
        model = HookedVLM.from_pretrained_no_processing(str(llava_dir), torch_dtype=torch.bfloat16)
    assert model.cfg.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="disagree"):
        HookedVLM.from_pretrained_no_processing(str(llava_dir), dtype=torch.float16, torch_dtype=torch.bfloat16)


def test_default_padding_side_reaches_the_tokenizer(llava_dir):
    default = HookedVLM.from_pretrained_no_processing(str(llava_dir)).tokenizer.padding_side
    other = "left" if default == "right" else "right"
    model = HookedVLM.from_pretrained_no_processing(str(llava_dir), default_padding_side=other)
    assert model.tokenizer.padding_side == other
    with pytest.raises(ValueError, match="'left' or 'right'"):
        HookedVLM.from_pretrained_no_processing(str(llava_dir), default_padding_side="middle")


@pytest.mark.parametrize("option", [{"n_devices": 2}, {"first_n_layers": 1}, {"move_to_device": False}])
def test_transformer_lens_only_options_are_refused_by_name(llava_dir, option):
    with pytest.raises(ValueError, match=f"TransformerLens's \\['{next(iter(option))}'\\]"):
        HookedVLM.from_pretrained(str(llava_dir), **option)
