import pytest

from fitserve.engine.detokenizer import MAX_PENDING_TOKENS, IncrementalDetokenizer
from fitserve.sampling_params import SamplingParams


class ByteDecoder:
    """Token id = one UTF-8 byte; cut-off characters decode to U+FFFD like real tokenizers."""

    def decode(self, token_ids, skip_special_tokens=True):
        return bytes(token_ids).decode("utf-8", errors="replace")


def feed(text, params, prompt=(65,)):
    detok = IncrementalDetokenizer(ByteDecoder(), tuple(prompt), params)
    deltas, stop = [], None
    for byte in text.encode():
        stop = detok.append(byte)
        deltas.append(detok.take_delta(finished=stop is not None))
        if stop:
            break
    return deltas, stop, detok


def test_multibyte_characters_are_emitted_whole():
    deltas, stop, _ = feed("héllo ✓", SamplingParams())
    assert stop is None
    assert "".join(deltas) == "héllo ✓"
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_split_across_tokens_is_found_and_removed():
    deltas, stop, detok = feed("The answer is 4. END of story", SamplingParams(stop=("END",)))
    assert stop == "END"
    assert "".join(deltas) == "The answer is 4. "
    assert detok.text == "The answer is 4. "


def test_stop_string_kept_when_asked():
    deltas, stop, _ = feed("abc STOP def", SamplingParams(stop=("STOP",), include_stop_str_in_output=True))
    assert stop == "STOP" and "".join(deltas) == "abc STOP"


def test_partial_stop_prefix_is_held_back_then_released():
    params = SamplingParams(stop=("XYZ",))
    detok = IncrementalDetokenizer(ByteDecoder(), (65,), params)
    streamed = ""
    for byte in b"abXY":
        assert detok.append(byte) is None
        streamed += detok.take_delta(finished=False)
    assert streamed == "ab", "'XY' may begin the stop string and must be held back"
    assert detok.append(ord("Q")) is None
    streamed += detok.take_delta(finished=False)
    streamed += detok.take_delta(finished=True)
    assert streamed == "abXYQ"


def test_earliest_stop_string_wins_and_text_before_is_kept():
    deltas, stop, _ = feed("one, two; three", SamplingParams(stop=("three", ";")))
    assert stop == ";" and "".join(deltas) == "one, two"


def test_stop_strings_wait_for_min_tokens():
    # "ab" ends at the 2nd token, inside min_tokens=3: ignored; the later "ab" (tokens 5-6) stops.
    deltas, stop, detok = feed("abxyab tail", SamplingParams(stop=("ab",), min_tokens=3))
    assert stop == "ab" and detok.text == "abxy"


class CountingDecoder(ByteDecoder):
    """ByteDecoder that records the longest list of ids it was asked to decode; 0 is "special"."""

    def __init__(self):
        self.longest = 0

    def decode(self, token_ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(token_ids))
        return super().decode([t for t in token_ids if t != 0] if skip_special_tokens else token_ids)


@pytest.mark.parametrize("token_id", [0xA0, 0])  # a UTF-8 continuation byte alone; a skipped special token
def test_tokens_that_never_print_keep_the_window_bounded(token_id):
    decoder = CountingDecoder()
    detok = IncrementalDetokenizer(decoder, (65, 66), SamplingParams())
    for _ in range(2000):
        detok.append(token_id)
    for byte in "ok".encode():
        detok.append(byte)
    assert decoder.longest <= 2 * MAX_PENDING_TOKENS + 2  # not the 2000 tokens of the output
    text = detok.text + detok.take_delta(finished=True)
    assert text.endswith("ok")
    if token_id:  # the stray bytes come out as replacement characters, as a whole decode gives them
        assert text.count("\ufffd") >= 2000 - MAX_PENDING_TOKENS


def test_a_four_byte_character_split_over_four_tokens_still_comes_out_whole():
    deltas, _, _ = feed("a😀b😀", SamplingParams())
    assert "".join(deltas) == "a😀b😀"
    assert all("\ufffd" not in d for d in deltas)
