"""Datasets as kohya users lay them out: N_name repeats and subsets, caption shuffling and
dropout, flip and random-crop augmentation, long captions and clip_skip."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from dandelion_p2p.errors import ConfigError
from dandelion_p2p.runconfig.schema import RunConfig
from dandelion_p2p.worker.batches import BatchMaker, crop_to_bucket
from dandelion_p2p.worker.captions import process_caption
from dandelion_p2p.worker.draws import Augmentation, Draws
from dandelion_p2p.worker.feeds import Batch, FolderFeed, Position
from dandelion_p2p.worker.kohya_dataset import SubsetSettings, folder_repeats
from dandelion_p2p.worker.link import SoloLink
from dandelion_p2p.worker.model import load_components
from dandelion_p2p.worker.text_encoding import chunked_ids, encode_prompts
from dandelion_p2p.worker.tiny import write_images
from dandelion_p2p.worker.train import Trainer, WorkerOptions
from tests.worker.runconfigs import tiny_run


def kohya_folder(root: Path, layout: dict[str, int]) -> Path:
    """``layout``: folder name -> images in it (distinct pixels in every folder)."""
    for seed, (name, count) in enumerate(layout.items()):
        write_images(root / name, count, seed=100 + seed)
    return root


class CountingTrainer(Trainer):
    """The real trainer, noting every sample its forward passes train."""

    drawn: Counter[str]

    def forward_backward(self, batch: Batch) -> float:
        if not hasattr(self, "drawn"):
            self.drawn = Counter()
        self.drawn.update(sample.key for sample in batch.samples)
        return super().forward_backward(batch)


def run_counting(config: RunConfig, data: Path, work: Path) -> CountingTrainer:
    toml = work.parent / f"{work.name}.toml"
    toml.write_text(config.to_toml())
    trainer = CountingTrainer(config, WorkerOptions(data=data, work_dir=work, export=False,
                                                    gradient_checkpointing=False),
                              SoloLink(toml))
    trainer.resume()
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer


def test_a_10_cat_folder_trains_its_images_ten_times_per_epoch(tiny_sd1: Path,
                                                               tmp_path: Path) -> None:
    data = kohya_folder(tmp_path / "data", {"10_cat": 2, "1_dog": 2})
    # 2 x 10 + 2 x 1 = 22 draws, in batches of 11 from one bucket: 2 steps are one epoch.
    config = tiny_run(tiny_sd1, training={"max_steps": 2, "batch_size": 11},
                      checkpoint={"every_steps": 100, "keep_last": 1})
    trainer = run_counting(config, data, tmp_path / "work")

    assert trainer.position.global_step == 2
    assert (trainer.position.epoch, trainer.position.batch_in_epoch) == (0, 2)
    cats = {k: n for k, n in trainer.drawn.items() if "/10_cat/" in k}
    dogs = {k: n for k, n in trainer.drawn.items() if "/1_dog/" in k}
    assert sorted(cats.values()) == [10, 10]
    assert sorted(dogs.values()) == [1, 1]
    assert sum(trainer.drawn.values()) == 22


def test_subsets_in_the_run_config_set_repeats_and_keep_the_folder_count(
        tiny_sd1: Path, tmp_path: Path) -> None:
    data = kohya_folder(tmp_path / "data", {"10_cat": 2, "dog": 3, "5_fox": 1})
    write_images(data, 2, seed=7)  # loose images at the top: once per epoch
    config = tiny_run(tiny_sd1, data={"subsets": [
        {"folder": "dog", "repeats": 4, "loss_weight": 0.5, "keep_tokens": 2},
        {"folder": "missing"}]})
    feed = FolderFeed(data, [(64, 64)], 3, [1], (0, 1), config=config)
    position = Position()
    counts: Counter[str] = Counter()
    while position.epoch == 0:
        batch = feed.next_batch(position)
        if position.epoch == 0:
            counts.update(Path(s.key).parent.name for s in batch.samples)
    assert counts == {"10_cat": 20, "dog": 12, "5_fox": 5, "data": 2}
    assert feed.describe() == "8 images, 39 draws per epoch"
    draws = Draws(config, feed.subset_folders)
    by_folder = {s.name: s for s in draws.table}
    assert by_folder["dog"].loss_weight == 0.5 and by_folder["dog"].keep_tokens == 2
    assert by_folder["10_cat"].keep_tokens == 0 and by_folder["10_cat"].repeats == 10


def test_folder_names_give_repeats_as_kohya_reads_them() -> None:
    assert folder_repeats("10_cat") == 10
    assert folder_repeats("1_my_dog") == 1
    assert folder_repeats("cat") is None
    assert folder_repeats("0_cat") is None
    assert folder_repeats("10cat") is None


def test_keep_tokens_stay_first_and_the_rest_is_shuffled_per_step() -> None:
    caption = "sks person, smiling, outdoors, red hat, blue sky, grass"
    settings = SubsetSettings("x", shuffle_caption=True, keep_tokens=2)
    drawn = {process_caption(caption, settings, 3, step, "h") for step in range(40)}
    assert len(drawn) > 10
    for text in drawn:
        tags = text.split(", ")
        assert tags[:2] == ["sks person", "smiling"]
        assert sorted(tags) == sorted(caption.split(", "))
    assert process_caption(caption, settings, 3, 5, "h") == process_caption(
        caption, settings, 3, 5, "h"), "a draw is a function of seed, step and image"
    assert process_caption(caption, SubsetSettings("x"), 3, 5, "h") == caption


def test_tag_dropout_leaves_out_tags_but_never_kept_ones() -> None:
    tags = [f"tag{i}" for i in range(20)]
    settings = SubsetSettings("x", keep_tokens=1, tag_dropout=0.5)
    lengths = []
    for step in range(50):
        out = process_caption(", ".join(tags), settings, 1, step, "h").split(", ")
        assert out[0] == "tag0"
        assert out == [t for t in tags if t in out], "order kept without shuffle"
        lengths.append(len(out) - 1)
    mean = sum(lengths) / len(lengths)
    assert 7 < mean < 12, mean  # about half of 19


def test_caption_dropout_is_per_subset(tiny_sd1: Path, tmp_path: Path) -> None:
    data = kohya_folder(tmp_path / "data", {"1_a": 1, "1_b": 1})
    config = tiny_run(tiny_sd1, training={"caption_dropout": 0.1},
                      data={"subsets": [{"folder": "1_b", "caption_dropout": 0.6}]})
    feed = FolderFeed(data, [(64, 64)], 2, [1], (0, 1), config=config)
    draws = Draws(config, feed.subset_folders)
    rates = {}
    for sample in feed.samples:
        empty = sum(draws.caption(sample, step) == "" for step in range(400))
        rates[Path(sample.key).parent.name] = empty / 400
    assert 0.05 < rates["1_a"] < 0.16, rates
    assert 0.5 < rates["1_b"] < 0.7, rates


def test_random_crop_windows_and_flip_mirror(tmp_path: Path) -> None:
    image = Image.new("RGB", (128, 64))
    image.paste((255, 0, 0), (0, 0, 64, 64))  # left half red, right half black
    left, cond_left = crop_to_bucket(image, (64, 64), Augmentation(crop=(0.0, 0.0)))
    right, cond_right = crop_to_bucket(image, (64, 64), Augmentation(crop=(1.0, 0.0)))
    centre, cond_centre = crop_to_bucket(image, (64, 64))
    assert left[0].mean() > 0.99 and right[0].mean() < -0.99
    assert (cond_left[3], cond_centre[3], cond_right[3]) == (0, 32, 64)
    flipped, _ = crop_to_bucket(image, (64, 64), Augmentation(flip=True))
    assert torch.equal(flipped, centre.flip(-1))


def tiny_components(tiny_sd1: Path) -> Any:
    return load_components(tiny_run(tiny_sd1).model)


def test_flipped_latents_are_cached_apart_and_cropped_ones_not(tiny_sd1: Path,
                                                                tmp_path: Path) -> None:
    write_images(tmp_path / "data", 1, size=(96, 64))
    feed = FolderFeed(tmp_path / "data", [(64, 64)], 1, [1], (0, 1))
    sample = feed.samples[0]
    c = tiny_components(tiny_sd1)
    maker = BatchMaker(c, tmp_path / "cache", torch.device("cpu"), cache_text=True)
    files = lambda: sorted(maker.latent_cache.root.rglob("*.safetensors"))  # noqa: E731
    plain, _ = maker.latents([sample], (64, 64))
    assert len(files()) == 1
    mirrored, _ = maker.latents([sample], (64, 64), [Augmentation(flip=True)])
    assert len(files()) == 2 and not torch.equal(plain, mirrored)
    again, _ = maker.latents([sample], (64, 64), [Augmentation(flip=True)])
    assert torch.equal(again, mirrored) and maker.latent_cache.hits == 1
    cropped, _ = maker.latents([sample], (64, 64), [Augmentation(crop=(0.0, 0.0))])
    assert len(files()) == 2, "a random crop is not cached"
    assert not torch.equal(cropped, plain)


def test_one_chunk_is_the_usual_tokenisation_and_long_captions_go_in_chunks(
        tiny_sd1: Path) -> None:
    c = tiny_components(tiny_sd1)
    tokenizer, encoder = c.tokenizers[0], c.text_encoders[0]
    window = tokenizer.model_max_length  # 16 here (77 for CLIP): chunks of 14 tokens
    captions = ["red cat", "a very long caption about a blue dog in the sea"]
    usual = tokenizer(captions, padding="max_length", max_length=window, truncation=True,
                      return_tensors="pt").input_ids
    assert torch.equal(chunked_ids(tokenizer, captions, 1), usual)

    cpu = torch.device("cpu")
    with torch.no_grad():
        one = encode_prompts([tokenizer], [encoder], captions, sdxl=False, clip_skip=1,
                             chunks=1, device=cpu)["hidden"]
        assert torch.equal(one, encoder(usual)[0])
        two = encode_prompts([tokenizer], [encoder], captions, sdxl=False, clip_skip=1,
                             chunks=2, device=cpu)["hidden"]
        assert two.shape == (2, 2 * window, one.shape[-1])
        assert torch.equal(two[:, :window], one)
        # The long caption's second chunk is its tokens 15-28, encoded as a prompt alone.
        tokens = tokenizer(captions[1], add_special_tokens=False).input_ids
        tail = tokenizer.decode(tokens[window - 2: 2 * (window - 2)]).replace(" ", "")
        tail_ids = chunked_ids(tokenizer, [captions[1]], 2)[1]
        assert tokenizer.decode(tail_ids[1:1 + len(tokens[window - 2:2 * (window - 2)])]
                                ).replace(" ", "") == tail
        assert torch.allclose(two[1, window:], encoder(tail_ids[None])[0][0], atol=1e-6)
        # The short caption's second chunk is the empty prompt.
        empty = encoder(chunked_ids(tokenizer, [""], 1))[0][0]
        assert torch.allclose(two[0, window:], empty, atol=1e-6)


def test_clip_skip_reads_an_earlier_layer_through_the_final_norm(tiny_sd1: Path) -> None:
    c = tiny_components(tiny_sd1)
    tokenizer, encoder = c.tokenizers[0], c.text_encoders[0]
    cpu = torch.device("cpu")
    with torch.no_grad():
        ids = chunked_ids(tokenizer, ["red cat"], 1)
        states = encoder(ids, output_hidden_states=True).hidden_states
        two = encode_prompts([tokenizer], [encoder], ["red cat"], sdxl=False, clip_skip=2,
                             chunks=1, device=cpu)["hidden"]
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        assert torch.allclose(two, norm(states[-2]))
        one = encode_prompts([tokenizer], [encoder], ["red cat"], sdxl=False, clip_skip=1,
                             chunks=1, device=cpu)["hidden"]
        assert not torch.allclose(one, two)
        with pytest.raises(ConfigError, match="only 2 layers"):
            encode_prompts([tokenizer], [encoder], ["x"], sdxl=False, clip_skip=3,
                           chunks=1, device=cpu)


def test_the_trainer_trains_with_every_data_setting_on(tiny_sd1: Path, tmp_path: Path) -> None:
    data = kohya_folder(tmp_path / "data", {"3_cat": 2, "dog": 2})
    for path in (data / "3_cat").glob("*.txt"):
        path.write_text("sks cat, " + ", ".join(f"tag{i}" for i in range(30)))
    config = tiny_run(tiny_sd1, training={"max_steps": 2},
                      data={"shuffle_caption": True, "keep_tokens": 1, "tag_dropout": 0.2,
                            "flip": True, "random_crop": True, "clip_skip": 2,
                            "max_token_length": 150,
                            "subsets": [{"folder": "dog", "loss_weight": 2.0,
                                         "flip": False, "random_crop": False}]})
    trainer = run_counting(config, data, tmp_path / "work")
    assert trainer.position.global_step == 2
    assert not trainer.batches.cache_text, "shuffled captions are not cached"
    losses = [line for line in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 2
    # Random crops are never cached; the dog subset's plain latents are.
    cached = list((tmp_path / "work" / "cache" / "latents").rglob("*.safetensors"))
    assert len(cached) == len([k for k in trainer.drawn if "/dog/" in k])


def test_sample_images_condition_as_training_does(tiny_sd1: Path, tmp_path: Path) -> None:
    from dandelion_p2p.worker.sampling import sample_images
    from dandelion_p2p.worker.text_encoding import pipeline_prompt

    config = tiny_run(tiny_sd1, training={"sample_prompts": ["red cat"], "sample_steps": 2},
                      data={"clip_skip": 2, "max_token_length": 150})
    c = tiny_components(tiny_sd1)
    cpu = torch.device("cpu")
    kwargs = pipeline_prompt(c, config.data, "red cat", cpu)
    window = c.tokenizers[0].model_max_length
    assert kwargs["prompt_embeds"].shape[1] == 2 * window
    assert kwargs["negative_prompt_embeds"].shape == kwargs["prompt_embeds"].shape
    assert pipeline_prompt(c, tiny_run(tiny_sd1).data, "red cat", cpu) == {"prompt": "red cat"}
    paths = sample_images(c, config, tmp_path / "samples", 1, cpu, None)
    assert len(paths) == 1 and Image.open(paths[0]).size == (64, 64)


def test_sdxl_long_captions_keep_the_first_chunks_pooled_embedding(tmp_path: Path) -> None:
    from dandelion_p2p.worker.tiny import build_tiny_pipeline

    base = build_tiny_pipeline(tmp_path / "sdxl", "sdxl")
    c = load_components(tiny_run(base, model={"base": str(base), "family": "sdxl"}).model)
    captions = ["red cat", "a very long caption about a blue dog in the sea"]
    cpu = torch.device("cpu")
    with torch.no_grad():
        one = encode_prompts(c.tokenizers, c.text_encoders, captions, sdxl=True, clip_skip=1,
                             chunks=1, device=cpu)
        three = encode_prompts(c.tokenizers, c.text_encoders, captions, sdxl=True,
                               clip_skip=1, chunks=3, device=cpu)
    window = c.tokenizers[0].model_max_length
    assert three["hidden"].shape == (2, 3 * window, one["hidden"].shape[-1])
    assert torch.allclose(three["hidden"][:, :window], one["hidden"], atol=1e-6)
    assert torch.allclose(three["pooled"], one["pooled"], atol=1e-6)


def test_a_subsets_loss_weight_scales_its_samples_loss_and_gradient(
        tiny_sd1: Path, tmp_path: Path) -> None:
    data = kohya_folder(tmp_path / "data", {"dog": 2})
    measured = {}
    for weight in (1.0, 0.25):
        config = tiny_run(tiny_sd1, data={"subsets": [{"folder": "dog", "loss_weight": weight}]})
        work = tmp_path / f"work-{weight}"
        toml = tmp_path / f"run-{weight}.toml"
        toml.write_text(config.to_toml())
        trainer = Trainer(config, WorkerOptions(data=data, work_dir=work, export=False,
                                                gradient_checkpointing=False), SoloLink(toml))
        try:
            batch = trainer.feed.next_batch(Position())
            assert {Path(s.key).parent.name for s in batch.samples} == {"dog"}
            loss = trainer.forward_backward(batch)
            grad = torch.cat([p.grad.flatten() for p in trainer.params if p.grad is not None])
            measured[weight] = (loss, grad.clone())
        finally:
            trainer.close()
    (loss_one, grad_one), (loss_quarter, grad_quarter) = measured[1.0], measured[0.25]
    assert loss_one > 0
    assert loss_quarter == pytest.approx(0.25 * loss_one, rel=1e-5)
    torch.testing.assert_close(grad_quarter, 0.25 * grad_one, rtol=1e-4, atol=1e-9)
