"""Paired comparisons: the student alone and every distilled student of a seed start from
the same weights and see the same data, and the teacher cache changes nothing but speed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY_STUDENT, tiny_config

from kaseg import stages
from kaseg.config import Config, from_dict
from kaseg.distill import Distiller, FeatureDims, build_losses
from kaseg.distill.teacher import TeacherFeatureStore, TeacherOutputs
from kaseg.engine.checkpoint import load_checkpoint, save_checkpoint
from kaseg.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TEACHER = {"name": "deeplabv3plus_resnet18", "output_stride": 8, "decoder_stride": 8, "head_channels": 8}


def config_for(tmp_path, name, **sections) -> Config:
    return from_dict(Config, tiny_config(tmp_path, name, **sections))


def save_teacher(tmp_path) -> str:
    torch.manual_seed(123)
    teacher = build_model(num_classes=8, **TINY_TEACHER)
    path = tmp_path / "teacher.pt"
    save_checkpoint({"arch": teacher.arch, "model": teacher.state_dict()}, path)
    return str(path)


def test_student_initialisation_depends_on_the_seed_only(tmp_path):
    config = config_for(tmp_path, "a")
    torch.manual_seed(1)
    first = stages.build_student(config, 8).state_dict()
    torch.manual_seed(2)
    torch.randn(1000)  # whatever was drawn before (a teacher built, say)
    second = stages.build_student(config, 8).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = stages.build_student(config_for(tmp_path, "b", seed=1), 8).state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)
    # Building the student leaves the global stream where it was.
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    stages.build_student(config, 8)
    assert torch.equal(torch.rand(3), expected)


def test_distill_without_losses_is_the_student_alone(tmp_path):
    """Same initial weights, data order, augmentation and dropout stream: a distillation run
    whose only loss is the cross-entropy ends bit-identical to `kaseg train`."""
    settings = dict(model={**TINY_STUDENT, "dropout": 0.2}, train={"iterations": 4})
    alone = config_for(tmp_path, "alone", **settings)
    paired = config_for(
        tmp_path, "paired", **settings, teacher={"checkpoint": save_teacher(tmp_path)},
        distill={"losses": [], "autoencoder": False},
    )
    stages.train_segmenter(alone, progress=False)
    stages.distill(paired, progress=False)
    a = load_checkpoint(alone.run_dir / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(paired.run_dir / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def make_distiller(cache_mb: float) -> Distiller:
    torch.manual_seed(0)
    teacher = build_model(num_classes=4, **TINY_TEACHER)
    student = build_model(num_classes=4, **{**TINY_STUDENT, "dropout": 0.0})
    dims = FeatureDims(student.feature_channels, teacher.feature_channels, teacher.feature_channels, 4)
    losses = build_losses([{"name": "adapt"}, {"name": "affinity"}, {"name": "kd"}], dims)
    return Distiller(teacher, student, encoder=None, losses=losses, teacher_cache_mb=cache_mb)


def test_teacher_cache_returns_what_the_teacher_computes():
    distiller = make_distiller(cache_mb=1).eval()
    cache = distiller.teacher_outputs
    images = torch.randn(3, 3, 32, 32)
    first = cache(images)
    assert (cache.hits, cache.misses, cache.cached_entries) == (0, 3, 3)
    again = cache(images[[2, 0]])
    assert (cache.hits, cache.misses) == (2, 3)
    assert torch.equal(again["features"], first["features"][[2, 0]])
    with torch.no_grad():
        for index in range(3):  # one image at a time: independent of batch composition
            expected = distiller.teacher(images[index : index + 1])
            assert torch.equal(first["features"][index], expected["features"][0])
            assert torch.equal(first["logits"][index], expected["logits"][0])
        # A different input (a flip) is a different entry.
        cache(images.flip(-1))
    assert cache.misses == 6


def test_teacher_cache_keeps_losses_identical_and_respects_its_size():
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    cached, plain = make_distiller(cache_mb=1).eval(), make_distiller(cache_mb=0).eval()
    with torch.no_grad():
        first, second = cached(images, masks), cached(images, masks)
        reference = plain(images, masks)
    assert cached.teacher_outputs.hits == 2
    for key in first:
        assert torch.equal(first[key], second[key]), key
        torch.testing.assert_close(first[key], reference[key], rtol=1e-5, atol=1e-6)

    small = TeacherOutputs(cached.teacher, cache_mb=1.5 * 8 * 4 * 4 * 4 / 2**20)  # 1.5 entries of 8 x 4 x 4 floats
    small(images)
    small(images)
    assert small.cached_entries == 1 and small.hits == 1 and small.misses == 3


def test_a_store_is_shared_by_stages_of_one_teacher_only():
    distiller = make_distiller(cache_mb=0).eval()
    store = TeacherFeatureStore(cache_mb=1)
    images = torch.randn(2, 3, 32, 32)
    first = TeacherOutputs(distiller.teacher, store=store)
    first(images)
    second = TeacherOutputs(distiller.teacher, store=store)  # a later stage, same teacher
    second(images)
    assert (second.hits, second.misses, len(store)) == (2, 0, 2)
    other = build_model(num_classes=4, **TINY_TEACHER).eval()
    with pytest.raises(ValueError, match="filled by another teacher"):
        TeacherOutputs(other, store=store)(images)


def test_teacher_cache_needs_a_classifier():
    class LogitsOnly(torch.nn.Module):
        def forward(self, images):
            return {"logits": images, "features": images}

    with pytest.raises(ValueError, match="classify.*teacher.cache_mb=0"):
        TeacherOutputs(LogitsOnly(), cache_mb=10)
    with pytest.raises(ValueError, match="cache_mb must be >= 0"):
        TeacherOutputs(LogitsOnly(), cache_mb=-1)


class Interrupt(Exception):
    pass


def interrupt_and_resume(config: Config, monkeypatch, reads: int, stopped_at: int) -> None:
    """Runs ``config``'s distillation until its training set has served ``reads`` images
    (the run dies there, after its iteration-``stopped_at`` checkpoint), then resumes it."""
    build = stages.build_train_dataset

    class FailsLate(torch.utils.data.Dataset):
        def __init__(self, dataset, reads):
            self.dataset, self.reads = dataset, reads

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, key):
            self.reads -= 1
            if self.reads < 0:
                raise Interrupt
            return self.dataset[key]

    monkeypatch.setattr(stages, "build_train_dataset", lambda data: FailsLate(build(data), reads=reads))
    with pytest.raises(Interrupt):
        stages.distill(config, progress=False)
    assert load_checkpoint(config.run_dir / "checkpoints" / "last.pt")["iteration"] == stopped_at
    monkeypatch.setattr(stages, "build_train_dataset", build)
    stages.distill(dataclasses.replace(config, train=dataclasses.replace(config.train, resume="auto")), progress=False)


def test_cached_distillation_resumes_bit_identically(tmp_path, monkeypatch):
    """A run interrupted after its iteration-4 checkpoint and resumed with an empty cache
    ends exactly where the uninterrupted run does."""
    teacher = save_teacher(tmp_path)
    settings = dict(
        model={**TINY_STUDENT, "dropout": 0.1},
        data={"scale_range": [1.0, 1.0], "hflip": True, "options": {"num_images": 6, "num_val_images": 3, "size": 32}},
        train={"iterations": 8, "checkpoint_every": 4},
        teacher={"checkpoint": teacher, "cache_mb": 16},
        distill={"losses": [{"name": "adapt"}, {"name": "affinity"}, {"name": "kd"}], "autoencoder": False},
    )
    straight = config_for(tmp_path, "straight", **settings)
    stages.distill(straight, progress=False)

    interrupted = config_for(tmp_path, "interrupted", **settings)
    interrupt_and_resume(interrupted, monkeypatch, reads=5 * 4 + 2, stopped_at=4)
    a = load_checkpoint(straight.run_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(interrupted.run_dir / "checkpoints" / "last.pt")
    assert a["iteration"] == b["iteration"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])


def test_a_distillation_warmup_resumes_bit_identically_and_changes_the_run(tmp_path, monkeypatch):
    """The warm-up factor follows the iteration number, so a run resumed from its
    iteration-2 checkpoint ends where the uninterrupted one does."""
    teacher = save_teacher(tmp_path)
    settings = dict(
        model=TINY_STUDENT,
        data={"scale_range": [1.0, 1.0], "hflip": False, "workers": 0,
              "options": {"num_images": 6, "num_val_images": 3, "size": 32}},
        train={"iterations": 5, "checkpoint_every": 2},
        teacher={"checkpoint": teacher},
        distill={"losses": [{"name": "adapt", "weight": 5.0}], "autoencoder": False, "warmup_iterations": 4},
    )
    straight = config_for(tmp_path, "straight", **settings)
    stages.distill(straight, progress=False)
    interrupted = config_for(tmp_path, "interrupted", **settings)
    interrupt_and_resume(interrupted, monkeypatch, reads=3 * 4 + 2, stopped_at=2)
    no_warmup = {**settings["distill"], "warmup_iterations": 0}
    without = config_for(tmp_path, "without", **{**settings, "distill": no_warmup})
    stages.distill(without, progress=False)
    a, b, c = (load_checkpoint(run.run_dir / "checkpoints" / "last.pt") for run in (straight, interrupted, without))
    assert a["iteration"] == b["iteration"] == 5
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
