"""The data format registry: resolving a format, reading a source, and what enters the fingerprint."""

from dataclasses import replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recsys.data.cache import fingerprint
from recsys.data.formats import AUTO, FORMATS, Source, describe, read_interactions, resolve_format
from recsys.data.preprocess import PreprocessSettings
from recsys.errors import UserInputError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_read_interactions_requires_columns_for_generic_files(write_file):
    path = write_file("e.csv", "user,item\n1,2\n")
    with pytest.raises(UserInputError, match="data.columns: required"):
        read_interactions(Source("interactions", str(path)))
    with pytest.raises(UserInputError, match="data.format: 'xml' is not one of"):
        read_interactions(Source("xml", str(path)))


def test_only_retailrocket_reads_a_test_file(write_file):
    path = write_file("seq.txt", "1 1 2 3\n")
    with pytest.raises(
        UserInputError, match=r"^data.test_path: only data.format=retailrocket reads one, not 'sequence'$"
    ):
        read_interactions(Source("sequence", str(path), test_path=str(path)))
    with pytest.raises(UserInputError, match=r"^data.path: required unless data.format is 'synthetic'$"):
        resolve_format(AUTO, None)


def test_every_data_config_names_a_registered_format_and_common_yaml_lists_them():
    for config in CONFIGS.glob("data/*.yaml"):
        assert OmegaConf.load(config).get("format", AUTO) in [AUTO, *FORMATS], config.name
    comment = (CONFIGS / "data" / "common.yaml").read_text()
    assert " | ".join([AUTO, *FORMATS]) in comment


@pytest.mark.parametrize(
    "source, expected",
    [
        # Fingerprints of the code before the registry: trained checkpoints record them.
        (
            Source("synthetic", synthetic={"num_users": 10}),
            "90758dcad50c10d353ddd3e43c0ee798a4dfd0a7916f293ae4f7b15fdf4de9f3",
        ),
        (Source("sequence", "seq.txt"), "fbf7b350443207d4f2a64b086f9277f5d6b1d92d471f90b6244d0041b58228ba"),
        (
            Source("interactions", "e.csv", columns={"user": "user", "item": "item"}),
            "0790ae5a166fb21045ce03334d4dd5afafcf9cc1e08c71c4770ccba2062c2c42",
        ),
        (
            Source("retailrocket", "e.csv", test_path="seq.txt"),
            "3bdfc13020b484526e77f19a6df33267b4eb91840e23110fe95cf7d372a4722f",
        ),
    ],
)
def test_fingerprints_stay_what_they_were(write_file, source, expected):
    write_file("e.csv", "user,item\n1,2\n")
    directory = write_file("seq.txt", "1 1 2 3 4\n2 2 3 4 5\n").parent

    def located(path):
        return None if path is None else str(directory / path)

    source = replace(source, path=located(source.path), test_path=located(source.test_path))
    assert fingerprint(describe(source), PreprocessSettings()) == expected


def test_only_the_options_a_format_names_enter_its_fingerprint(write_file):
    path = str(write_file("seq.txt", "1 1 2 3 4\n"))
    plain = describe(Source("sequence", path))
    assert describe(Source("sequence", path, columns={"user": "u"}, sep=";", synthetic={"seed": 1})) == plain
    assert set(plain) == {"format", "sha256"}  # the bytes, not the path
    assert describe(Source(AUTO, path)) == plain
    interactions = describe(Source("interactions", path, columns={"user": "u"}))
    assert interactions["columns"] == {"user": "u"} and interactions["sep"] == ","


def test_a_file_format_without_a_path_names_the_key():
    with pytest.raises(UserInputError, match=r"^data.path: required for data.format='sequence'$"):
        describe(Source(format="sequence"))
