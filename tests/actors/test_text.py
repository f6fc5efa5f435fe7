"""A row's output reads as what follows its prompt: no leading separator space, whichever kind of
tokenizer, and never a broken trailing character (tokenizers built here: byte-level BPE as GPT-2 and
SmolLM2, and a SentencePiece-style Metaspace BPE as Llama and Mistral)."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from actors.text import continuation

CORPUS = ["Review: a great film. Sentiment: positive", "Review: dull and slow. Sentiment: negative",
          "Le café est très bon.", "Answer: 42", "the answer is  two spaces"] * 20


def _tokenizer(kind: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "metaspace" else None))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = []
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>"],
                                                        initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["bytelevel", "metaspace"])
def tokenizer(request):
    return _tokenizer(request.param)


def _split(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer, cut where the prompt's own tokens end."""
    whole = tokenizer(prompt + answer)["input_ids"]
    n = len(tokenizer(prompt)["input_ids"])
    assert tokenizer.decode(whole[:n]).strip() == prompt.strip(), "the prompt ends on a token boundary"
    return whole[:n], whole[n:]


def test_the_output_has_no_leading_space(tokenizer):
    prompt, new = _split(tokenizer, "Review: a great film. Sentiment:", " positive")
    assert tokenizer.decode(new, skip_special_tokens=True) in (" positive", "positive")  # differs by kind
    assert continuation(tokenizer, prompt, new) == "positive"


def test_only_one_leading_space_is_dropped(tokenizer):
    prompt, new = _split(tokenizer, "the answer is", "  two spaces")
    assert continuation(tokenizer, prompt, new) == " two spaces"


def test_a_character_cut_in_its_middle_is_dropped():
    tokenizer = _tokenizer("bytelevel")
    prompt, new = _split(tokenizer, "Answer:", " Le café")
    for cut in range(1, len(new) + 1):
        text = continuation(tokenizer, prompt, new[:cut])
        assert "\ufffd" not in text, (cut, text)
        assert "Le café".startswith(text), (cut, text)
    broken = [c for c in range(1, len(new)) if "\ufffd" in tokenizer.decode(new[:c])]
    assert broken, "some cut of ' Le café' ends inside 'é' (two bytes, two tokens here)"
    assert continuation(tokenizer, prompt, new) == "Le café"
