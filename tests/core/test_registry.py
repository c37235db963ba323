"""The registry: families are found by listing vlm_lens/architectures/, each registered once by HF class name."""

import importlib

import pytest

from vlm_lens.architectures import all_specs, get_spec, register, supported_architectures


def test_every_family_folder_is_registered():
    assert {s.family for s in all_specs()} >= {"llava", "llava_next", "llava_onevision", "qwen2_5_vl"}
    assert supported_architectures() == sorted(s.name for s in all_specs())
    for spec in all_specs():
        package = importlib.import_module(f"vlm_lens.architectures.{spec.family}")
        assert package.SPEC is spec and spec.hf_class().__name__ == spec.name


def test_a_second_registration_of_a_name_raises():
    spec = get_spec("LlavaForConditionalGeneration")
    with pytest.raises(ValueError, match="already registered"):
        register(spec)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(ValueError, match="LlavaNextForConditionalGeneration"):
        get_spec("GPT2LMHeadModel")


def test_lookup_imports_the_family_named_by_model_type_first():
    """Loading a LLaVA checkpoint imports the llava family (and the pixtral family it reuses for Pixtral
    towers) only; a model_type with no folder of its own falls back to importing every family. Mistral 3
    (model_type "mistral3", registered by the pixtral family) is then found without that fallback."""
    import subprocess
    import sys

    code = (
        "import sys; from vlm_lens.architectures import get_spec\n"
        "assert get_spec('LlavaForConditionalGeneration', 'llava').family == 'llava'\n"
        "assert not any(m.startswith('vlm_lens.architectures.qwen') for m in sys.modules)\n"
        "assert get_spec('Mistral3ForConditionalGeneration', 'mistral3').family == 'pixtral'\n"
        "assert not any(m.startswith('vlm_lens.architectures.qwen') for m in sys.modules)\n"
        "assert get_spec('Qwen3VLForConditionalGeneration', 'no_such_folder').family == 'qwen3_vl'\n"
        "assert 'vlm_lens.architectures.gemma3' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
