"""Chat templates against the prompt formats the model families document."""
import pytest

from kvcells import Model
from kvcells.chat_template import CHATML, GEMMA, LLAMA3, ChatTemplate, ChatTemplateError


@pytest.fixture(scope="module")
def gemma_model(real_model_path):
    return Model.load(real_model_path)


@pytest.fixture(scope="module")
def tiny_llama_model(tiny_gguf):
    return Model.load(tiny_gguf("llama"))


def gemma():
    return ChatTemplate(GEMMA, "gemma", "<bos>", "<eos>")


def test_gemma_single_user_turn():
    text = gemma().render([{"role": "user", "content": "Hi there"}])
    assert text == "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"


def test_gemma_system_folds_into_first_user_turn():
    text = gemma().render([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": " Red. "},
        {"role": "user", "content": "Another?"},
    ])
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nName a colour.<end_of_turn>\n"
                    "<start_of_turn>model\nRed.<end_of_turn>\n"
                    "<start_of_turn>user\nAnother?<end_of_turn>\n"
                    "<start_of_turn>model\n")


def test_gemma_without_generation_prompt():
    text = gemma().render([{"role": "user", "content": "x"}], add_generation_prompt=False)
    assert text == "<bos><start_of_turn>user\nx<end_of_turn>\n"


def test_gemma_text_parts_are_joined():
    text = gemma().render([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                         {"type": "text", "text": "b"}]}])
    assert "\nab<end_of_turn>" in text


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}],
])
def test_gemma_refuses_roles_out_of_turn(messages):
    with pytest.raises(ChatTemplateError, match="alternate"):
        gemma().render(messages)


@pytest.mark.parametrize("messages", [[], "hi", [{"content": "x"}], [{"role": "user", "content": 3}],
                                      [{"role": "user", "content": [{"type": "image_url"}]}]])
def test_malformed_messages(messages):
    with pytest.raises(ChatTemplateError):
        gemma().render(messages)


def test_chatml_and_llama3():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert ChatTemplate(CHATML, "chatml").render(msgs) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")
    assert ChatTemplate(LLAMA3, "llama3", "<|begin_of_text|>").render(msgs) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_sandbox_refuses_unsafe_access():
    t = ChatTemplate("{{ messages.__class__.__mro__ }}", "evil")
    with pytest.raises(ChatTemplateError):
        t.render([{"role": "user", "content": "x"}])


def test_bad_template_source():
    with pytest.raises(ChatTemplateError, match="broken"):
        ChatTemplate("{% for %}", "broken")


def test_real_model_uses_gemma_builtin_and_one_bos(gemma_model):
    t = ChatTemplate.for_model(gemma_model)
    assert t.name == "gemma"
    tok = gemma_model.tokenizer
    ids = t.encode(tok, [{"role": "user", "content": "Hello"}])
    start, end = tok.encode("<start_of_turn>", add_bos=False, special=True), \
        tok.encode("<end_of_turn>", add_bos=False, special=True)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids[1:2] == start and end[0] in ids
    assert tok.decode(ids[1:], special=True) == "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"


def test_for_model_by_name_file_and_missing(gemma_model, tiny_llama_model, tmp_path):
    assert ChatTemplate.for_model(gemma_model, name="chatml").name == "chatml"
    with pytest.raises(ChatTemplateError, match="unknown chat template"):
        ChatTemplate.for_model(gemma_model, name="nope")
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert ChatTemplate.for_model(gemma_model, path=f).render([{"role": "user", "content": "q"}]) == "[q]"
    with pytest.raises(ChatTemplateError, match="missing.jinja"):
        ChatTemplate.for_model(gemma_model, path=tmp_path / "missing.jinja")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatTemplate.for_model(tiny_llama_model)
