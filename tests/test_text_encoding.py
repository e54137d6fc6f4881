"""Tests for library/text/encoding.py on tiny random models: chunked ids, re-assembly, layer selection,
SDXL pooled/time ids/`y`, and prompt weighting for training and generation."""

import copy
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from library.text import encoding as te
from library.errors import UserError
from library.models.families import SD1, SD2, SDXL
from library.models.random_models import build_random_models
from library.text.tokenizer import load_tokenizers

BOS, EOS = 49406, 49407
A = 320  # "a"
CAT_CONTENT = [320, 1125, 539, 320, 2368]  # "a photo of a cat"
CAPTION = "a photo of a cat"
LONG_80 = "a " * 80  # 80 content tokens, all "a"


@pytest.fixture(scope="module")
def models():
    return {f.name: build_random_models(f, "tiny", seed=0) for f in (SD1, SD2, SDXL)}


@pytest.fixture(scope="module")
def conditioners(models):
    return {f.name: te.TextConditioner(f, load_tokenizers(f), models[f.name].text_encoders) for f in (SD1, SD2, SDXL)}


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def far(a, b):
    assert (a - b).abs().max() > 1e-3


def forward(encoder, rows):
    """Plain HF run over hand-built rows of 77 ids."""
    with torch.no_grad():
        return encoder(input_ids=torch.tensor(rows), output_hidden_states=True, return_dict=True)


# --- tokenizing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value,n", [(None, 1), (75, 1), (150, 2), (225, 3)])
def test_chunk_count(value, n):
    assert te.chunk_count(value) == n


@pytest.mark.parametrize("value", [76, 300, "150", 0])
def test_unsupported_max_token_length_is_a_user_error(value):
    with pytest.raises(UserError, match="--max_token_length"):
        te.chunk_count(value)


def test_short_caption_chunks_sd1_pad_eos(conditioners):
    tok = conditioners["sd1"].tokenizers[0]
    assert te.tokenize(tok, [CAPTION], None).tolist() == [[[BOS] + CAT_CONTENT + [EOS] * 71]]
    ids = te.tokenize(tok, [CAPTION], 225)
    assert ids.shape == (1, 3, 77)
    assert ids[0, 0].tolist() == [BOS] + CAT_CONTENT + [EOS] * 71
    assert ids[0, 1].tolist() == ids[0, 2].tolist() == [BOS] + [EOS] * 76


def test_short_caption_chunks_sd2_pad_zero(conditioners):
    tok = conditioners["sd2"].tokenizers[0]
    assert te.tokenize(tok, [CAPTION], None).tolist() == [[[BOS] + CAT_CONTENT + [EOS] + [0] * 70]]
    ids = te.tokenize(tok, [CAPTION], 225)
    assert ids[0, 0].tolist() == [BOS] + CAT_CONTENT + [EOS] + [0] * 70
    # empty chunks become BOS EOS PAD…
    assert ids[0, 1].tolist() == ids[0, 2].tolist() == [BOS, EOS] + [0] * 75


def test_long_caption_chunks(conditioners):
    sd1, sd2 = conditioners["sd1"].tokenizers[0], conditioners["sd2"].tokenizers[0]
    ids1 = te.tokenize(sd1, [LONG_80], 150)[0].tolist()
    assert ids1 == [[BOS] + [A] * 75 + [EOS], [BOS] + [A] * 5 + [EOS] * 71]
    ids2 = te.tokenize(sd2, [LONG_80], 225)[0].tolist()
    # chunk 0's content runs to its end, so its last id (a PAD in the padded row) becomes EOS
    assert ids2 == [[BOS] + [A] * 75 + [EOS], [BOS] + [A] * 5 + [EOS] + [0] * 70, [BOS, EOS] + [0] * 75]


def test_exactly_75_tokens_and_truncation(conditioners):
    sd2 = conditioners["sd2"].tokenizers[0]
    assert te.tokenize(sd2, ["a " * 75], 150)[0].tolist() == [[BOS] + [A] * 75 + [EOS], [BOS, EOS] + [0] * 75]
    assert te.tokenize(sd2, ["a " * 300], 225)[0].tolist() == [[BOS] + [A] * 75 + [EOS]] * 3


def test_sdxl_tokenizes_per_encoder_padding(conditioners):
    ids_te1, ids_te2 = conditioners["sdxl"].tokenize([CAPTION, LONG_80], 150)
    assert ids_te1.shape == ids_te2.shape == (2, 2, 77)
    assert ids_te1[0, 1].tolist() == [BOS] + [EOS] * 76
    assert ids_te2[0, 1].tolist() == [BOS, EOS] + [0] * 75
    assert ids_te2[1, 1].tolist() == [BOS] + [A] * 5 + [EOS] + [0] * 70


# --- encoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_plain_encoding_is_last_hidden_state(conditioners, name):
    cond = conditioners[name]
    rows = te.tokenize(cond.tokenizers[0], [CAPTION]).reshape(1, 77).tolist()
    with torch.no_grad():
        out = cond.encode([CAPTION])
    assert out.pooled is None
    close(out.context, forward(cond.text_encoders[0], rows).last_hidden_state)


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_long_mode_matches_plain_except_slot_76(conditioners, name):
    """A caption that fits: chunk 0 is the plain row, so states 0..75 agree; slot 76 is chunk 1's first content
    slot (an EOS/PAD state computed in another context) instead of the plain row's last state."""
    cond = conditioners[name]
    with torch.no_grad():
        plain = cond.encode([CAPTION])
        long = cond.encode([CAPTION], max_token_length=225)
    assert long.context.shape == (1, 227, plain.context.shape[-1])
    close(long.context[:, :76], plain.context[:, :76])
    far(long.context[:, 76], plain.context[:, 76])
    if plain.pooled is not None:
        close(long.pooled, plain.pooled)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_reassembly_of_a_long_caption(conditioners, name):
    cond = conditioners[name]
    ids = te.tokenize(cond.tokenizers[0], [LONG_80], 150)
    chunks = forward(cond.text_encoders[0], ids[0].tolist()).last_hidden_state
    expected = torch.cat([chunks[0, :1], chunks[0, 1:76], chunks[1, 1:76], chunks[1, 76:]]).unsqueeze(0)
    with torch.no_grad():
        got = te.encode_hidden(cond.text_encoders[0], ids, None, final_layer_norm=True)
    assert got.shape == (1, 152, 32)
    close(got, expected)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_clip_skip_selects_layer_then_final_layer_norm(conditioners, name):
    cond = conditioners[name]
    encoder = cond.text_encoders[0]
    out = forward(encoder, te.tokenize(cond.tokenizers[0], [CAPTION]).reshape(1, 77).tolist())
    with torch.no_grad():
        skip1 = cond.encode([CAPTION], clip_skip=1).context
        skip2 = cond.encode([CAPTION], clip_skip=2).context
        expected2 = te.final_layer_norm(encoder)(out.hidden_states[-2])
    close(skip1, out.last_hidden_state)
    close(skip2, expected2)
    far(skip1, skip2)


def test_clip_skip_out_of_range(conditioners):
    with pytest.raises(UserError, match="--clip_skip 24 is out of range.*23 layers"):
        conditioners["sd2"].encode([CAPTION], clip_skip=24)
    with pytest.raises(UserError, match="--clip_skip"):
        conditioners["sd1"].encode([CAPTION], clip_skip=0)


def test_sdxl_context_and_pooled(conditioners):
    cond = conditioners["sdxl"]
    te1, te2 = cond.text_encoders
    ids1, ids2 = (t.reshape(1, 77).tolist() for t in cond.tokenize([CAPTION]))
    out1, out2 = forward(te1, ids1), forward(te2, ids2)
    with torch.no_grad():
        got = cond.encode([CAPTION], clip_skip=None)
        pooled = te2.text_projection(out2.last_hidden_state[:, len(CAT_CONTENT) + 1])
    assert len(out1.hidden_states) == 13  # 12 layers: index 11 is the penultimate
    close(got.context, torch.cat([out1.hidden_states[11], out2.hidden_states[-2]], dim=-1))
    assert got.context.shape == (1, 77, 64)
    close(got.pooled, pooled)


def test_sdxl_pooled_at_first_eos_with_textual_inversion_token(models):
    tokenizers = load_tokenizers(SDXL)
    encoders = [copy.deepcopy(e) for e in models["sdxl"].text_encoders]
    for tok, enc in zip(tokenizers, encoders):
        tok.add_tokens(["<ti>"])
        enc.resize_token_embeddings(len(tok))
    cond = te.TextConditioner(SDXL, tokenizers, encoders)
    ids2 = cond.tokenize(["a <ti> cat"])[1]
    assert ids2[0, 0, :5].tolist() == [BOS, A, 49408, 2368, EOS]
    out = forward(encoders[1], ids2.reshape(1, 77).tolist())
    with torch.no_grad():
        at_eos = encoders[1].text_projection(out.last_hidden_state[:, 4])
        at_max_id = encoders[1].text_projection(out.last_hidden_state[:, 2])  # HF's legacy argmax(ids) pooling
        short = cond.encode(["a <ti> cat"])
        long = cond.encode(["a <ti> cat"], max_token_length=150)
    close(short.pooled, at_eos)
    close(long.pooled, at_eos)
    far(short.pooled, at_max_id)


def test_training_clip_skip_rules():
    assert te.training_clip_skip(SD1, 2) == (2, None)
    assert te.training_clip_skip(SD1, None) == (None, None)
    value, warning = te.training_clip_skip(SDXL, 2)
    assert value is None and "ignored" in warning
    value, warning = te.training_clip_skip(SD2, 2)
    assert value == 2 and "penultimate" in warning


# --- SDXL vector conditioning ----------------------------------------------------------------------


def test_time_ids_order():
    assert te.sdxl_time_ids((1500, 1000), (32, 0), (640, 384)).tolist() == [1500, 1000, 32, 0, 640, 384]
    originals, targets = torch.tensor([[1500, 1000], [1024, 1024]]), torch.tensor([[640, 384], [1024, 1024]])
    batched = te.sdxl_time_ids(originals, (0, 0), targets)
    assert batched.tolist() == [[1500, 1000, 0, 0, 640, 384], [1024, 1024, 0, 0, 1024, 1024]]


def test_size_embedding_formula():
    emb = te.size_embeddings(torch.tensor([0, 1, 0, 0, 0, 0]))
    assert emb.shape == (1536,)
    close(emb[:128], torch.ones(128))
    close(emb[128:256], torch.zeros(128))
    # second scalar = 1: cos(f_k), sin(f_k) with f_k = 10000^(-k/128)
    f = torch.tensor([1.0, 10000 ** (-1 / 128), 10000 ** (-127 / 128)])
    close(emb[[256, 257, 383]], torch.cos(f))
    close(emb[[384, 385, 511]], torch.sin(f))


def test_vector_cond_matches_diffusers_unet(models):
    unet = models["sdxl"].unet
    pooled = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    time_ids = te.sdxl_time_ids(torch.tensor([[1500, 1000], [1024, 768]]), torch.tensor([[32, 0], [0, 10]]),
                                torch.tensor([[640, 384], [1024, 768]]))
    y = te.sdxl_vector_cond(pooled, time_ids)
    assert y.shape == (2, 32 + 1536)
    assert unet.config.projection_class_embeddings_input_dim == y.shape[1]
    with torch.no_grad():
        close(y[:, 32:], unet.add_time_proj(time_ids.flatten()).reshape(2, -1))
        emb = torch.zeros(2, unet.time_embedding.linear_2.out_features)
        internal = unet.get_aug_embed(emb=emb, encoder_hidden_states=None,
                                      added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
        close(unet.add_embedding(y), internal)
    # unbatched time ids are shared by the batch
    close(te.sdxl_vector_cond(pooled, time_ids[0]), torch.cat([pooled, y[:1, 32:].expand(2, -1)], dim=-1))


# --- prompt weighting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("max_token_length", [None, 150])
def test_training_weight_one_equals_unweighted(conditioners, max_token_length):
    cond = conditioners["sdxl"]
    with torch.no_grad():
        plain = cond.encode([CAPTION], max_token_length)
        weighted = cond.encode(["a (photo:1.0) of a cat"], max_token_length, weighted=True)
    close(weighted.context, plain.context)
    close(weighted.pooled, plain.pooled)


@pytest.mark.parametrize("name,max_token_length", [("sd1", None), ("sd2", 150), ("sdxl", 150)])
def test_training_weight_scales_only_its_tokens(conditioners, name, max_token_length):
    cond = conditioners[name]
    with torch.no_grad():
        plain = cond.encode([CAPTION], max_token_length)
        weighted = cond.encode(["a photo of a (cat:1.5)"], max_token_length, weighted=True)
    cat = len(CAT_CONTENT)  # position of "cat" after BOS
    close(weighted.context[:, cat], plain.context[:, cat] * 1.5)
    others = [i for i in range(plain.context.shape[1]) if i != cat]
    close(weighted.context[:, others], plain.context[:, others])
    if plain.pooled is not None:
        close(weighted.pooled, plain.pooled)  # the pooled vector is never weighted


def test_weighted_tokens_and_weights(conditioners):
    tok = conditioners["sd2"].tokenizers[0]
    ids, weights = te.tokenize_weighted(tok, ["an (important) word", "[x]"], None)
    assert ids[0, 0, :5].tolist() == [BOS, 550, 2829, 2653, EOS]
    assert ids[1, 0, :3].tolist() == [BOS, 343, EOS]
    close(weights[0, 0, :5], torch.tensor([1.0, 1.0, 1.1, 1.0, 1.0]))
    close(weights[1, 0, :3], torch.tensor([1.0, 1 / 1.1, 1.0]))
    assert weights[:, :, 5:].eq(1.0).all()


def test_generation_weight_one_equals_plain(conditioners):
    for name in ("sd1", "sdxl"):
        cond = conditioners[name]
        with torch.no_grad():
            plain = cond.encode([CAPTION])
            gen = cond.encode_weighted(["a photo of a (cat:1.0)"], max_embeddings_multiples=3)
        close(gen.context, plain.context)


def test_generation_keeps_every_chunk_and_shares_length(conditioners, caplog):
    cond = conditioners["sd2"]
    ids = te.tokenize(cond.tokenizers[0], [LONG_80], 150)
    chunks = forward(cond.text_encoders[0], ids[0].tolist()).last_hidden_state
    with torch.no_grad():
        gen = cond.encode_weighted([CAPTION, LONG_80], max_embeddings_multiples=3)
    assert gen.context.shape == (2, 154, 32)  # two chunks of 77, BOS/EOS of each kept
    close(gen.context[1], chunks.reshape(154, 32))
    with caplog.at_level(logging.WARNING, logger="library.text.encoding"), torch.no_grad():
        assert cond.encode_weighted([LONG_80], max_embeddings_multiples=1).context.shape == (1, 77, 32)
    assert "truncated to 75 tokens" in caplog.text


@pytest.mark.parametrize("mode", ["none", "original", "abs"])
def test_generation_weight_normalisation(conditioners, mode):
    cond = conditioners["sdxl"]
    with torch.no_grad():
        plain = cond.encode_weighted([CAPTION]).context
        weighted = cond.encode_weighted(["a photo of a (cat:1.5)"], normalize=mode).context
    cat = len(CAT_CONTENT)
    scaled = plain.clone()
    scaled[:, cat] *= 1.5
    if mode == "none":
        close(weighted, scaled)
        return
    for half in (slice(0, 32), slice(32, 64)):  # each encoder is normalised on its own, as gen_img does
        measure = (lambda x: x.abs().mean()) if mode == "abs" else (lambda x: x.mean())
        close(weighted[..., half], scaled[..., half] * measure(plain[..., half]) / measure(scaled[..., half]))
        close(measure(weighted[..., half]), measure(plain[..., half]))


def test_generation_default_clip_skip_matches_training(conditioners):
    """gen_img defaults SD2 to clip_skip 2; here generation uses training's layer (the last)."""
    cond = conditioners["sd2"]
    with torch.no_grad():
        default = cond.encode_weighted([CAPTION]).context
        training = cond.encode([CAPTION]).context
        skip2 = cond.encode_weighted([CAPTION], clip_skip=2).context
    close(default, training)
    far(default, skip2)


def test_generation_argument_errors(conditioners):
    cond = conditioners["sd1"]
    with pytest.raises(UserError, match="--emb_normalize_mode"):
        cond.encode_weighted([CAPTION], normalize="mean")
    with pytest.raises(UserError, match="--max_embeddings_multiples"):
        cond.encode_weighted([CAPTION], max_embeddings_multiples=0)
