"""The built-in family templates against oracles nobody here wrote.

- llama3 against Meta's own encoder, `llama_models.llama3.chat_format.ChatFormat`, with the tokenizer file that
  package ships (tiktoken BPE), converted offline to a transformers tokenizer by transformers' TikTokenConverter;
- mistral and mistral-v1 against mistral-common's v3 and v1 instruct tokenizers (`MistralTokenizer.from_file` on the
  SentencePiece files the package ships), each converted offline to a transformers LlamaTokenizer;
- gemma and phi3 (no maker encoder on PyPI that works offline) against their published Jinja chat templates, as
  written in the models' tokenizer_config.json, rendered by transformers' apply_chat_template.

For multi-turn conversations with and without a system prompt, our render + tokenize_example must give the maker's
token ids, and our loss mask must cover exactly the assistant spans as the maker's encoder delimits them (per
message, as mistral-finetune and llama-recipes build their masks): the reply and its end-of-turn token.

The converted tokenizers are cached in pytest's cache dir (conversion takes seconds; loading the cache does not).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.data import IGNORE, render, tokenize_example

CONVERSATIONS = [
    [("user", "Hi there"), ("assistant", "Hello! How can I help?")],
    [("system", "Be brief."), ("user", "Say red."), ("assistant", "red!")],
    [("user", "What is 2 + 3?"), ("assistant", "5"), ("user", "And times 4?\nShow it."), ("assistant", "5 x 4 = 20.")],
    [("system", "You answer in French.\nAlways."), ("user", "Hello"), ("assistant", "Bonjour !"),
     ("user", "Thanks, café?"), ("assistant", "Merci, café ☕."), ("user", "Bye"), ("assistant", "Au revoir.")],
]


def _messages(conversation):
    return [{"role": role, "content": content} for role, content in conversation]


def _ours(conversation, template: str, tokenizer, generation_prompt: bool = False):
    segments = render(_messages(conversation), template, tokenizer, add_generation_prompt=generation_prompt)
    example = tokenize_example(segments, tokenizer, 10**6, train_on_prompt=False)
    return example.input_ids, [i for i, label in enumerate(example.labels) if label != IGNORE]


def _cached(pytestconfig, tmp_path_factory, name: str, build) -> Path:
    """A transformers tokenizer dir built once by `build(dir)`, kept in pytest's cache between sessions."""
    from transformers import AutoTokenizer

    cache = getattr(pytestconfig, "cache", None)  # absent under `-p no:cacheprovider`
    root = cache.mkdir("oracle-tokenizers") if cache else tmp_path_factory.mktemp("oracle")
    path = root / name
    if not (path / "tokenizer.json").is_file():
        build(path)
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- llama3: Meta's ChatFormat

@pytest.fixture(scope="module")
def llama3(pytestconfig, tmp_path_factory):
    llama_tokenizer = pytest.importorskip("llama_models.llama3.tokenizer")
    from llama_models.llama3.chat_format import ChatFormat

    maker = llama_tokenizer.Tokenizer.get_instance()

    def build(path: Path):
        from tokenizers import processors
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter

        specials = sorted(maker.special_tokens, key=maker.special_tokens.get)
        converted = TikTokenConverter(vocab_file=str(Path(llama_tokenizer.__file__).parent / "tokenizer.model"),
                                      pattern=maker.pat_str, extra_special_tokens=specials).converted()
        # as Meta's Llama 3 tokenizer.json: BOS added on encode
        converted.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                          special_tokens=[("<|begin_of_text|>", maker.bos_id)])])
        PreTrainedTokenizerFast(tokenizer_object=converted, bos_token="<|begin_of_text|>",
                                eos_token="<|end_of_text|>").save_pretrained(path)

    return ChatFormat(maker), _cached(pytestconfig, tmp_path_factory, "llama3", build)


def _llama3_reference(chat_format, conversation):
    from llama_models.datatypes import RawMessage, ToolPromptFormat

    ids, spans = [chat_format.tokenizer.bos_id], []
    header = len(chat_format._encode_header("assistant"))
    for role, content in conversation:
        tokens, _ = chat_format.encode_message(RawMessage(role=role, content=content), ToolPromptFormat.json)
        if role == "assistant":
            spans += range(len(ids) + header, len(ids) + len(tokens))
        ids += tokens
    return ids, spans


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_llama3_matches_metas_chat_format(llama3, k):
    from llama_models.datatypes import RawMessage

    chat_format, tokenizer = llama3
    conversation = CONVERSATIONS[k]
    ids, spans = _ours(conversation, "llama3", tokenizer)
    assert (ids, spans) == _llama3_reference(chat_format, conversation)
    assert ids.count(tokenizer.bos_token_id) == 1  # the template writes it, the tokenizer would add it
    assert tokenizer.decode([ids[i] for i in spans]).endswith("<|eot_id|>")
    prompt = conversation[:-1]
    expected = chat_format.encode_dialog_prompt([RawMessage(role=r, content=c) for r, c in prompt]).tokens
    assert _ours(prompt, "llama3", tokenizer, generation_prompt=True)[0] == expected


# ---------------------------------------------------------------- mistral: mistral-common v3

MISTRAL_FILES = {"mistral": "mistral_instruct_tokenizer_240323.model.v3", "mistral-v1": "tokenizer.model.v1"}


@pytest.fixture(scope="module", params=list(MISTRAL_FILES))
def mistral(request, pytestconfig, tmp_path_factory):
    pytest.importorskip("sentencepiece")
    mistral_common = pytest.importorskip("mistral_common.tokens.tokenizers.mistral")
    from mistral_common.protocol.instruct.validator import ValidationMode

    model_file = mistral_common.MistralTokenizer._data_path() / MISTRAL_FILES[request.param]
    maker = mistral_common.MistralTokenizer.from_file(str(model_file), mode=ValidationMode.finetuning)

    def build(path: Path):
        import shutil

        from transformers import LlamaTokenizer

        path.mkdir(parents=True)
        shutil.copy(model_file, path / "tokenizer.model")
        LlamaTokenizer.from_pretrained(path, legacy=False).save_pretrained(path)
        (path / "tokenizer.model").unlink()

    return request.param, maker, _cached(pytestconfig, tmp_path_factory, request.param, build)


def _mistral_reference(maker, conversation):
    """mistral-common's encoding, message by message as its encode_instruct walks them, with the assistant spans
    (encode_assistant_message: the reply and EOS); checked against encode_chat_completion whole."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    instruct = maker.instruct_tokenizer
    system = "\n\n".join(c for r, c in conversation if r == "system") or None
    turns = [(r, c) for r, c in conversation if r != "system"]
    users = [i for i, (r, _) in enumerate(turns) if r == "user"]
    ids, spans = list(instruct.start()), []
    for i, (role, content) in enumerate(turns):
        if role == "user":
            tokens = instruct.encode_user_message(UserMessage(content=content), None, is_last=i == users[-1],
                                                  is_first=i == users[0], system_prompt=system)[0]
        else:
            tokens = instruct.encode_assistant_message(AssistantMessage(content=content),
                                                       is_before_last_user_message=i < users[-1])
            spans += range(len(ids), len(ids) + len(tokens))
        ids += tokens
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    whole = maker.encode_chat_completion(ChatCompletionRequest(messages=[kinds[r](content=c) for r, c in conversation]))
    assert ids == whole.tokens
    return ids, spans


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_mistral_matches_mistral_common(mistral, k):
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import InstructRequest

    name, maker, tokenizer = mistral
    assert type(maker.instruct_tokenizer).__name__ == {"mistral": "InstructTokenizerV3",
                                                         "mistral-v1": "InstructTokenizerV1"}[name]
    conversation = CONVERSATIONS[k]
    ids, spans = _ours(conversation, name, tokenizer)
    assert (ids, spans) == _mistral_reference(maker, conversation)
    assert ids.count(tokenizer.bos_token_id) == 1
    prompt = conversation[:-1]
    system = "\n\n".join(c for r, c in prompt if r == "system") or None
    request = InstructRequest(messages=[(UserMessage if r == "user" else AssistantMessage)(content=c)
                                        for r, c in prompt if r != "system"], system_prompt=system)
    assert _ours(prompt, name, tokenizer, generation_prompt=True)[0] == \
        maker.instruct_tokenizer.encode_instruct(request).tokens


# ---------------------------------------------------------------- gemma, phi3: their published Jinja templates

# As published in the models' tokenizer_config.json (google/gemma-3-*-it, string contents; microsoft/Phi-3.5-mini-
# instruct), reproduced here as the oracle
PUBLISHED = {
    "gemma": (
        "{{ bos_token }}\n"
        "{%- if messages[0]['role'] == 'system' -%}\n"
        "    {%- if messages[0]['content'] is string -%}\n"
        "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
        "    {%- else -%}\n"
        "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
        "    {%- endif -%}\n"
        "    {%- set loop_messages = messages[1:] -%}\n"
        "{%- else -%}\n"
        "    {%- set first_user_prefix = \"\" -%}\n"
        "    {%- set loop_messages = messages -%}\n"
        "{%- endif -%}\n"
        "{%- for message in loop_messages -%}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
        "    {%- endif -%}\n"
        "    {%- if (message['role'] == 'assistant') -%}\n"
        "        {%- set role = \"model\" -%}\n"
        "    {%- else -%}\n"
        "        {%- set role = message['role'] -%}\n"
        "    {%- endif -%}\n"
        "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
        "    {%- if message['content'] is string -%}\n"
        "        {{ message['content'] | trim }}\n"
        "    {%- endif -%}\n"
        "    {{ '<end_of_turn>\\n' }}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "    {{'<start_of_turn>model\\n'}}\n"
        "{%- endif -%}\n"
    ),
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
        "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
        "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
}


@pytest.fixture(scope="module")
def family_tokenizer(tiny_tokenizer):
    """The tiny Llama-style tokenizer with every built-in template's control tokens as special tokens."""
    import copy

    from tunelab.data.builtin_templates import CONTROL_TOKENS

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_tokens([t for tokens in CONTROL_TOKENS.values() for t in tokens], special_tokens=True)
    return tokenizer


@pytest.mark.parametrize("name", ["gemma", "phi3"])
def test_gemma_and_phi3_match_their_published_templates(family_tokenizer, name):
    """Same text, same ids as apply_chat_template with the published template, and the loss on exactly each reply
    and its end-of-turn token (where the published template's own rendering of the conversation so far ends)."""
    tokenizer = family_tokenizer
    end = {"gemma": "<end_of_turn>", "phi3": "<|end|>"}[name]
    for conversation in CONVERSATIONS:
        messages = _messages(conversation)
        published = tokenizer.apply_chat_template(messages, chat_template=PUBLISHED[name], tokenize=False)
        ids, spans = _ours(conversation, name, tokenizer)
        assert "".join(text for text, _ in render(messages, name, tokenizer)) == published
        bos = [tokenizer.bos_token_id] if not published.startswith(tokenizer.bos_token) else []  # tokenizer adds it
        assert ids == bos + tokenizer.encode(published, add_special_tokens=False)
        replies, start = [], 0
        for i, (role, content) in enumerate(conversation):
            if role == "assistant":  # the published rendering of the prompt, then this reply
                before = tokenizer.apply_chat_template(messages[:i], chat_template=PUBLISHED[name], tokenize=False,
                                                       add_generation_prompt=True)
                assert published.startswith(before)
                replies.append(content.strip() + end)
        trained = tokenizer.decode([ids[i] for i in spans])
        assert trained == "".join(replies)
        prompt = messages[:-1]
        assert "".join(t for t, _ in render(prompt, name, tokenizer, add_generation_prompt=True)) == \
            tokenizer.apply_chat_template(prompt, chat_template=PUBLISHED[name], tokenize=False,
                                          add_generation_prompt=True)


@pytest.mark.parametrize("name", ["chatml", "alpaca", "llama3", "mistral", "mistral-v1", "gemma", "phi3"])
def test_each_builtin_saves_a_jinja_template_that_renders_what_it_trained_on(family_tokenizer, name):
    """The Jinja twin installed as the run's chat template (what merged models carry to other tools) renders the
    same text as the template training used, with and without a generation prompt."""
    from tunelab.data.builtin_templates import JINJA

    for conversation in CONVERSATIONS:
        messages = _messages(conversation)
        for messages, gen in ((messages, False), (messages[:-1], True)):
            ours = "".join(t for t, _ in render(messages, name, family_tokenizer, add_generation_prompt=gen))
            assert ours == family_tokenizer.apply_chat_template(messages, chat_template=JINJA[name], tokenize=False,
                                                               add_generation_prompt=gen)
