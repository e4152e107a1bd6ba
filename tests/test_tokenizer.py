"""minispin.tokenizer against transformers (and sentencepiece) on the zephyr and Llama-2 tokenizer fixtures."""

import json
import random
import re
import sys

import pytest

from minispin.tokenizer import SPIN_TEMPLATE, _compile_chat_template, load_tokenizer
import tiny

FIXTURES = tiny.FIXTURES / "tokenizers"
ZEPHYR = FIXTURES / "zephyr"
LLAMA2 = FIXTURES / "llama2"

TEXTS = [
    "",
    "hello",
    "Hello, world!",
    " hello",
    "  two leading spaces",
    "trailing space ",
    "a  b   c    d",
    "\nleading newline",
    "line one\nline two\n\nline four\n",
    "\ttab\t and  spaces",
    "héllo wörld — naïve café",
    "你好，世界",
    "emoji 🤖🚀 and ZWJ 👩‍💻",
    "Ünïcödé: ß, æ, ø, Ω, ∑, √2",
    "12345 3.14159 1,000,000 2024-01-01",
    "x = [1, 2, 3]  # code\n    return x",
    "Hi</s> there <s>x",
    "</s>",
    "<s>hi",
    "hi </s>",
    "a <s> b",
    "</s></s>",
    "<unk> unknown",
    "x</s>\n<|user|>\nhi",
    "<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n",
    "▁x literal metaspace",
    "\u00a0non-breaking\u2009thin space",
]

SPECIALS = ("<unk>", "<s>", "</s>")


def random_texts(count, seed):
    """Short random strings mixing spaces, newlines, unicode, digits, literal "▁" and special tokens."""
    rng = random.Random(seed)
    alphabet = list("abcXYZ019 \n\t.,!?éü你🤖▁") + ["  ", " the", "ing", "</s>", "<s>", "<unk>"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(count)]


def segments(text):
    """The text between special tokens."""
    return [s for s in re.split("|".join(re.escape(t) for t in SPECIALS), text) if s]


def diverges_from_transformers5(text):
    """Where transformers 5.x's rebuilt Metaspace pre-tokenizer differs from the stored tokenizer.json
    normalizer (module docstring): a piece between special tokens that starts with a space or "▁"."""
    return any(s.startswith((" ", "▁")) for s in segments(text))


def transformers_major():
    transformers = pytest.importorskip("transformers")
    return int(transformers.__version__.split(".")[0])


@pytest.fixture(scope="module")
def zephyr():
    return load_tokenizer(ZEPHYR)


@pytest.fixture(scope="module")
def zephyr_sp():
    return load_tokenizer(ZEPHYR, backend="sentencepiece")


@pytest.fixture(scope="module")
def llama2():
    return load_tokenizer(LLAMA2)


@pytest.fixture(scope="module")
def hf_zephyr():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(ZEPHYR), local_files_only=True)


def hf_sentencepiece_legacy(folder):
    """transformers' slow sentencepiece tokenizer (legacy: split on special tokens, sentencepiece per piece)."""
    pytest.importorskip("transformers")
    backend = pytest.importorskip("transformers.tokenization_utils_sentencepiece")
    return backend.SentencePieceBackend(
        vocab_file=str(folder / "tokenizer.model"), bos_token="<s>", eos_token="</s>", unk_token="<unk>", legacy=True
    )


def config_folder(tmp_path, source, files, config=None, **extra_files):
    """A tokenizer folder in tmp_path with `files` linked from `source` and the given JSON files."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in files:
        (tmp_path / name).symlink_to(source / name)
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in extra_files.items():
        (tmp_path / name.replace("__", ".")).write_text(content)
    return tmp_path


# ------------------------------------------------------------------------------------------------
# Token ids


def test_zephyr_ids_match_transformers(zephyr, hf_zephyr):
    reference_sp = hf_sentencepiece_legacy(ZEPHYR) if transformers_major() >= 5 else None
    checked = {"transformers": 0, "sentencepiece": 0}
    for text in TEXTS + random_texts(300, seed=1):
        for add_special in (True, False):
            ours = zephyr.encode(text, add_special_tokens=add_special)
            if reference_sp is not None and diverges_from_transformers5(text):
                # Documented divergence: follow the stored normalizer = sentencepiece (= transformers 4.x).
                expected = ([1] if add_special else []) + reference_sp.encode(text)
                checked["sentencepiece"] += 1
            else:
                expected = hf_zephyr.encode(text, add_special_tokens=add_special)
                checked["transformers"] += 1
            assert ours == expected, (text, add_special)
    assert checked["transformers"] > 300 and (reference_sp is None or checked["sentencepiece"] > 50)


def test_zephyr_sentencepiece_path_matches_tokenizer_json(zephyr, zephyr_sp):
    assert zephyr.backend == "tokenizers" and zephyr_sp.backend == "sentencepiece"
    for text in TEXTS + random_texts(500, seed=2):
        ids = zephyr.encode(text)
        assert zephyr_sp.encode(text) == ids, text
        assert zephyr_sp.decode(ids) == zephyr.decode(ids), text
        assert zephyr_sp.decode(ids, skip_special_tokens=True) == zephyr.decode(ids, skip_special_tokens=True), text


def test_llama2_ids_match_transformers_slow_legacy(llama2):
    reference = hf_sentencepiece_legacy(LLAMA2)
    assert (llama2.bos_token, llama2.bos_id, llama2.eos_token, llama2.eos_id) == ("<s>", 1, "</s>", 2)
    assert llama2.add_bos_token and not llama2.add_eos_token and llama2.legacy
    for text in TEXTS + random_texts(300, seed=3):
        expected = reference.encode(text)
        assert llama2.encode(text, add_special_tokens=False) == expected, text
        assert llama2.encode(text) == [1] + expected, text


def test_llama2_matches_raw_sentencepiece_without_special_tokens(llama2):
    # Meta's reference: bos + sp.encode(text); identical wherever the text holds no special token.
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2 / "tokenizer.model"))
    for text in TEXTS + random_texts(200, seed=4):
        if not any(t in text for t in SPECIALS):
            assert llama2.encode(text) == [sp.bos_id()] + sp.encode(text), text


def test_non_legacy_sentencepiece_matches_transformers_metaspace_first(tmp_path):
    # tokenizer_config.json "legacy": false -> transformers' LlamaTokenizer(legacy=False), whose
    # pre-tokenizer is Metaspace(prepend_scheme="first"); built here from zephyr's tokenizer.json.
    transformers = pytest.importorskip("transformers")
    folder = config_folder(tmp_path / "zephyr_nl", ZEPHYR, ["tokenizer.model"], config={"legacy": False})
    ours = load_tokenizer(folder)
    assert ours.backend == "sentencepiece" and not ours.legacy
    reference = transformers.LlamaTokenizer.from_pretrained(str(ZEPHYR), local_files_only=True, legacy=False)
    for text in TEXTS + random_texts(300, seed=5):
        ids = reference.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False) == ids, text
        assert ours.encode(text) == [1] + ids, text
        assert ours.decode(ids) == reference.decode(ids), text


def test_llama2_folder_with_only_tokenizer_model_as_transformers5_loads_it(tmp_path):
    # transformers 5.x reads a bare tokenizer.model only with protobuf installed; it builds a non-legacy
    # LlamaTokenizer without BOS, whose merges (ordered by id, not score) split runs of whitespace
    # differently from sentencepiece, so texts with whitespace runs are left out here.
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    folder = config_folder(tmp_path / "llama2_nl", LLAMA2, ["tokenizer.model"], config={"legacy": False})
    ours = load_tokenizer(folder)
    reference = transformers.LlamaTokenizer.from_pretrained(str(LLAMA2), local_files_only=True, legacy=False)
    compared = 0
    for text in TEXTS + random_texts(300, seed=6):
        if re.search(r"[ ▁]{2}", text):
            continue
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False), text
        compared += 1
    assert compared > 100


def test_long_text_is_not_truncated(zephyr, zephyr_sp, hf_zephyr):
    from tokenizers import Tokenizer

    text = "hi " * 5999 + "hi"
    raw = Tokenizer.from_file(str(ZEPHYR / "tokenizer.json"))
    assert raw.truncation["max_length"] == 2048 and len(raw.encode(text).ids) == 2048  # the fixture's block
    ids = zephyr.encode(text)
    assert len(ids) == 6001
    assert ids == hf_zephyr.encode(text, truncation=False)
    assert zephyr_sp.encode(text) == ids
    assert zephyr.encode_batch([text, "hi"])[0] == ids
    assert zephyr.decode(ids, skip_special_tokens=True) == text


# ------------------------------------------------------------------------------------------------
# Decoding and batches


def test_decode_round_trip(zephyr, zephyr_sp, llama2):
    for tokenizer in (zephyr, zephyr_sp, llama2):
        for text in TEXTS + random_texts(200, seed=7):
            if any(t in text for t in SPECIALS + ("▁",)):  # a literal "▁" decodes as a space
                continue
            assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text, (tokenizer, text)
            assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text, (tokenizer, text)


def test_decode_matches_transformers(zephyr, zephyr_sp, hf_zephyr):
    rng = random.Random(8)
    id_lists = [zephyr.encode(text) for text in TEXTS]
    id_lists += [[243, 162], [243, 162, 167, 153, 243], [1, 2, 0, 13, 28705, 28705], []]  # broken UTF-8 bytes
    id_lists += [[rng.randrange(zephyr.vocab_size) for _ in range(rng.randint(1, 30))] for _ in range(100)]
    for ids in id_lists:
        for skip in (False, True):
            expected = hf_zephyr.decode(ids, skip_special_tokens=skip)
            assert zephyr.decode(ids, skip_special_tokens=skip) == expected, ids
            assert zephyr_sp.decode(ids, skip_special_tokens=skip) == expected, ids


def test_batch_helpers(zephyr, llama2):
    texts = TEXTS[:10]
    for tokenizer in (zephyr, llama2):
        batch = tokenizer.encode_batch(texts)
        assert batch == [tokenizer.encode(t) for t in texts]
        assert tokenizer.encode_batch(texts, add_special_tokens=False) == [tokenizer.encode(t, False) for t in texts]
        assert tokenizer.decode_batch(batch, skip_special_tokens=True) == texts


# ------------------------------------------------------------------------------------------------
# Special tokens and settings


def test_special_token_attributes(zephyr, zephyr_sp, llama2, hf_zephyr):
    for tokenizer in (zephyr, zephyr_sp):
        assert tokenizer.bos_token == hf_zephyr.bos_token and tokenizer.bos_id == hf_zephyr.bos_token_id == 1
        assert tokenizer.eos_token == hf_zephyr.eos_token and tokenizer.eos_id == hf_zephyr.eos_token_id == 2
        assert tokenizer.pad_token == hf_zephyr.pad_token and tokenizer.pad_id == hf_zephyr.pad_token_id
        assert tokenizer.unk_id == hf_zephyr.unk_token_id == 0
        assert tokenizer.vocab_size == len(tokenizer) == len(hf_zephyr) == 32000
        assert tokenizer.add_bos_token and not tokenizer.add_eos_token
        assert tokenizer.stop_ids == [2]
        assert tokenizer.chat_template == hf_zephyr.chat_template
    assert llama2.pad_token is None and llama2.pad_id == llama2.eos_id == 2  # pad falls back to eos
    assert llama2.vocab_size == 32000 and llama2.chat_template is None


def test_tokenizer_model_file_path_reads_sibling_config():
    tokenizer = load_tokenizer(ZEPHYR / "tokenizer.model")
    assert tokenizer.backend == "sentencepiece" and tokenizer.chat_template is not None
    assert tokenizer.encode("Hi</s>") == load_tokenizer(ZEPHYR).encode("Hi</s>")
    assert load_tokenizer(str(LLAMA2 / "tokenizer.model")).encode("hello") == load_tokenizer(LLAMA2).encode("hello")
    assert load_tokenizer(ZEPHYR / "tokenizer.json").backend == "tokenizers"


def test_add_bos_and_eos_settings_are_honoured(tmp_path):
    files = ["tokenizer.model"]
    eos_on = load_tokenizer(config_folder(tmp_path / "a", LLAMA2, files, config={"add_eos_token": True}))
    assert eos_on.encode("hi") == [1] + eos_on.encode("hi", add_special_tokens=False) + [2]
    bos_off = load_tokenizer(config_folder(tmp_path / "b", LLAMA2, files, config={"add_bos_token": False}))
    assert bos_off.encode("hi") == bos_off.encode("hi", add_special_tokens=False)
    json_files = ["tokenizer.json"]
    json_no_bos = load_tokenizer(config_folder(tmp_path / "c", ZEPHYR, json_files, config={"add_bos_token": False}))
    assert json_no_bos.encode("hi")[0] != 1
    # Without a config the stored post-processor decides (zephyr's adds <s>).
    assert load_tokenizer(config_folder(tmp_path / "d", ZEPHYR, json_files)).encode("hi")[0] == 1


def test_special_tokens_from_dicts_and_generation_config(tmp_path):
    config = {"bos_token": {"content": "<s>"}, "eos_token": {"content": "</s>", "lstrip": False}, "pad_token": "<unk>"}
    folder = config_folder(
        tmp_path / "t", LLAMA2, ["tokenizer.model"], config=config,
        generation_config__json=json.dumps({"eos_token_id": [2, 13]}),
    )
    tokenizer = load_tokenizer(folder)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)
    assert tokenizer.stop_ids == [2, 13]
    # special_tokens_map.json is read when tokenizer_config.json does not name a token
    folder = config_folder(
        tmp_path / "m", LLAMA2, ["tokenizer.model"], special_tokens_map__json=json.dumps({"pad_token": {"content": "<unk>"}})
    )
    assert load_tokenizer(folder).pad_id == 0


# ------------------------------------------------------------------------------------------------
# Chat templates

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a friendly chatbot."},
        {"role": "user", "content": "Tell me a joke about llamas 🦙."},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "  Write 2 lines\nof poetry."},
        {"role": "assistant", "content": "Roses are red,\nviolets are blue."},
    ],
    [{"role": "user", "content": "Xin chào, bạn khỏe không?"}, {"role": "assistant", "content": "Tôi khỏe."}],
]


def test_chat_template_matches_transformers(zephyr, zephyr_sp, hf_zephyr):
    for conversation in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            expected = hf_zephyr.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            for tokenizer in (zephyr, zephyr_sp):
                text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
                assert text == expected
                assert tokenizer.apply_chat_template(conversation, add_generation_prompt, template="chat") == expected
            assert zephyr.encode(expected) == hf_zephyr.encode(expected)
            assert zephyr_sp.encode(expected) == hf_zephyr.encode(expected)
    assert zephyr.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True).endswith("</s>\n<|assistant|>\n")


LITERAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}"
    "{% if message['role'] == 'system' %}{% continue %}{% endif %}"
    "[{{ loop.index0 }}|{{ message['role'] | upper }}] {{ message['content'] | trim }}{{ eos_token }}\n"
    "{% endfor %}{{ messages | map(attribute='role') | list | tojson }}"
    "{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
)

# Indented block tags, as in many hub templates: trim_blocks / lstrip_blocks decide the whitespace.
INDENTED_TEMPLATE = """{% for message in messages %}
    {% if message.role == 'user' %}
        <user> {{ message.content }}
    {% else %}
        <{{ message.role }}> {{ message.content }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    <assistant>
{% endif %}"""


def test_literal_jinja_template_matches_transformers(zephyr, hf_zephyr):
    for template in (LITERAL_TEMPLATE, INDENTED_TEMPLATE):
        for conversation in CONVERSATIONS:
            for add_generation_prompt in (False, True):
                expected = hf_zephyr.apply_chat_template(
                    conversation, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
                )
                assert zephyr.apply_chat_template(conversation, add_generation_prompt, template=template) == expected


def test_template_raise_exception_and_syntax_errors(zephyr):
    with pytest.raises(ValueError, match="bad role tool"):
        zephyr.apply_chat_template([{"role": "tool", "content": "x"}], template=LITERAL_TEMPLATE)
    with pytest.raises(ValueError, match="cannot compile"):
        zephyr.apply_chat_template(CONVERSATIONS[0], template="{% for m in messages %}{{ m }")
    with pytest.raises(ValueError, match="unknown template 'alpaca'"):
        zephyr.apply_chat_template(CONVERSATIONS[0], template="alpaca")
    with pytest.raises(ValueError, match="failed on this conversation.*undefined"):
        zephyr.apply_chat_template(CONVERSATIONS[0], template="{{ messages[0].content.upper() + not_defined.x }}")
    with pytest.raises(ValueError, match="failed on this conversation"):  # the sandbox blocks internals
        zephyr.apply_chat_template(CONVERSATIONS[0], template="{{ messages.__class__.__subclasses__() }}")
    with pytest.raises(ValueError, match="message 0"):
        zephyr.apply_chat_template(["hello"])


def test_spin_template(zephyr, llama2):
    user = {"role": "user", "content": "Name three colours."}
    answer = {"role": "assistant", "content": "Red, green and blue."}
    system = {"role": "system", "content": "Be concise."}
    for tokenizer in (zephyr, llama2):
        assert tokenizer.apply_chat_template([user], template="spin") == SPIN_TEMPLATE.format(prompt=user["content"])
        assert tokenizer.apply_chat_template([user], True, template="spin") == (
            "### Instruction: Name three colours.\n\n### Response: "
        )
        assert tokenizer.apply_chat_template([system, user], template="spin") == (
            "### Instruction: Be concise.\n\nName three colours.\n\n### Response: "
        )
        assert tokenizer.apply_chat_template([user, answer], template="spin") == (
            "### Instruction: Name three colours.\n\n### Response: Red, green and blue."
        )
        assert tokenizer.render_prompt([system, user, answer], template="spin") == (
            tokenizer.apply_chat_template([system, user], template="spin")
        )
        with pytest.raises(ValueError, match="one instruction"):
            tokenizer.apply_chat_template([user, answer, user], template="spin")
        with pytest.raises(ValueError, match="one instruction"):
            tokenizer.apply_chat_template([answer], template="spin")


def test_render_prompt(zephyr, hf_zephyr):
    for conversation in CONVERSATIONS:
        prompt_messages = conversation[:-1] if conversation[-1]["role"] == "assistant" else conversation
        expected = hf_zephyr.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
        assert zephyr.render_prompt(conversation) == expected
        assert zephyr.render_prompt(prompt_messages, template="chat") == expected


def test_named_templates_and_chat_template_jinja_file(tmp_path):
    named = [{"name": "default", "template": "D{{ messages[0]['content'] }}"}, {"name": "rag", "template": "R"}]
    folder = config_folder(tmp_path / "named", LLAMA2, ["tokenizer.model"], config={"chat_template": named})
    tokenizer = load_tokenizer(folder)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "Dx"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], template="rag") == "R"
    folder = config_folder(tmp_path / "file", LLAMA2, ["tokenizer.model"], chat_template__jinja="J{{ eos_token }}")
    assert load_tokenizer(folder).apply_chat_template([]) == "J</s>"


def test_missing_jinja2_gives_clear_error(zephyr, monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)
    _compile_chat_template.cache_clear()
    try:
        with pytest.raises(ImportError, match="jinja2"):
            zephyr.apply_chat_template(CONVERSATIONS[0])
        assert zephyr.render_prompt(CONVERSATIONS[0], template="spin").startswith("### Instruction: ")
    finally:
        _compile_chat_template.cache_clear()


# ------------------------------------------------------------------------------------------------
# Bad input


def test_missing_path_and_missing_files(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"nope.*tokenizer\.json.*tokenizer\.model"):
        load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*tokenizer\.json and tokenizer\.model"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(LLAMA2, backend="tokenizers")


def test_malformed_files(tmp_path):
    folder = config_folder(tmp_path / "badcfg", LLAMA2, ["tokenizer.model"])
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>",')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: malformed JSON"):
        load_tokenizer(folder)
    folder = config_folder(tmp_path / "badmap", LLAMA2, ["tokenizer.model"], special_tokens_map__json="[1, 2]")
    with pytest.raises(ValueError, match=r"special_tokens_map\.json: expected a JSON object"):
        load_tokenizer(folder)
    (tmp_path / "badmodel").mkdir()
    (tmp_path / "badmodel" / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match=r"badmodel/tokenizer\.model: not a valid sentencepiece model"):
        load_tokenizer(tmp_path / "badmodel")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "tokenizer.json").write_text('{"model": {}}')
    with pytest.raises(ValueError, match=r"badjson/tokenizer\.json: not a valid tokenizers file"):
        load_tokenizer(tmp_path / "badjson")


def test_configured_token_not_in_vocab(tmp_path):
    for name, files, source in (("sp", ["tokenizer.model"], LLAMA2), ("json", ["tokenizer.json"], ZEPHYR)):
        folder = config_folder(tmp_path / name, source, files, config={"pad_token": {"content": "<pad>"}})
        with pytest.raises(ValueError, match=r"tokenizer_config\.json: pad_token '<pad>' is not in the vocabulary"):
            load_tokenizer(folder)
    folder = config_folder(tmp_path / "bad_type", LLAMA2, ["tokenizer.model"], config={"eos_token": 2})
    with pytest.raises(ValueError, match="eos_token must be a string"):
        load_tokenizer(folder)
    folder = config_folder(
        tmp_path / "map", LLAMA2, ["tokenizer.model"], special_tokens_map__json=json.dumps({"bos_token": "<|begin|>"})
    )
    with pytest.raises(ValueError, match=r"special_tokens_map\.json: bos_token '<\|begin\|>'"):
        load_tokenizer(folder)


def test_no_chat_template_error_names_config(llama2):
    with pytest.raises(ValueError, match=r"no chat_template \(looked in .*llama2/tokenizer_config\.json"):
        llama2.apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(ValueError, match="no chat_template"):
        llama2.render_prompt(CONVERSATIONS[0])


def test_decode_rejects_ids_outside_vocab(zephyr, llama2):
    for tokenizer in (zephyr, llama2):
        with pytest.raises(ValueError, match="token id 32000 is outside the vocabulary"):
            tokenizer.decode([5, 32000])
        with pytest.raises(ValueError, match="token id -1"):
            tokenizer.decode([-1])
