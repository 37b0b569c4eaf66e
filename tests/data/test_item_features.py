"""Item features: reading per-item attributes from each supported file, aligning them with a
catalogue's item indices, the cache round trip, the one-line errors and the fingerprint."""

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.data.item_features import (
    FORMATS,
    FeatureSource,
    ItemFeatures,
    align_item_features,
    read_item_features,
    resolve_feature_format,
)
from recsys.errors import UserInputError

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

U_GENRE = "unknown|0\nAction|1\nComedy|2\nDrama|3\n\n"


def write_u_item(directory: Path, rows: list[str], genre: str = U_GENRE) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "u.genre").write_bytes(genre.encode("latin-1"))
    path = directory / "u.item"
    path.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    return path


def one_line_error(match: str, read, *args):
    """Run `read(*args)`; it must raise a UserInputError of one line that matches `match`."""
    with pytest.raises(UserInputError, match=match) as caught:
        read(*args)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def rows_of(features: ItemFeatures) -> list[list[str]]:
    """Each row's attribute tokens, in stored order."""
    vocabulary = features.vocabulary
    return [
        [str(vocabulary[v]) for v in features.values[features.offsets[r] : features.offsets[r + 1]]]
        for r in range(len(features.offsets) - 1)
    ]


# -- reading each format ------------------------------------------------------------------------


def test_s3rec_keeps_each_attribute_once_in_first_occurrence_order(tmp_path):
    path = tmp_path / "Toy_item2attributes.json"
    path.write_text(json.dumps({"1": [3, 1, 3, 2, 1], "2": [7], "10": ["5"]}))
    assert resolve_feature_format(FeatureSource(str(path))) == "s3rec"
    assert read_item_features(FeatureSource(str(path))) == {
        "1": ["attribute=3", "attribute=1", "attribute=2"],
        "2": ["attribute=7"],
        "10": ["attribute=5"],
    }


def test_movielens_u_item_takes_genre_names_from_u_genre(tmp_path):
    path = write_u_item(
        tmp_path / "ml100k",
        [
            "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1|1",
            "2|Café (1996)|01-Jan-1996||http://y|0|1|0|0",  # latin-1 title
            "3|unknown||||1|0|0|0",  # the 'unknown' genre is a genre like any other
            "4|No flags (1997)|01-Jan-1997||http://z|0|0|0|0",  # no genre: no attributes, no error
        ],
    )
    features = read_item_features(FeatureSource(str(path)))
    assert features == {"1": ["genre=Comedy", "genre=Drama"], "2": ["genre=Action"], "3": ["genre=unknown"]}
    assert read_item_features(FeatureSource(str(path), format="movielens")) == features


def test_movielens_movies_dat(tmp_path):
    path = tmp_path / "movies.dat"
    path.write_bytes(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Citt\u00e0 (1995)::Drama|Drama\n"
        "3::Nothing (1999)::(no genres listed)\n".encode("latin-1")
    )
    assert resolve_feature_format(FeatureSource(str(path))) == "movielens"
    assert read_item_features(FeatureSource(str(path))) == {
        "1": ["genre=Animation", "genre=Children's", "genre=Comedy"],
        "2": ["genre=Drama"],
    }


def test_movielens_movies_csv_beside_ratings(tmp_path):
    path = tmp_path / "movies.csv"
    path.write_text(
        "movieId,title,genres\r\n"
        '1,"Toy Story, The (1995)",Adventure|Animation\r\n'
        "5,Some film (2018),(no genres listed)\r\n"
        "193609,Last (2018),Comedy\r\n"
    )
    # A movies.csv alone is just a CSV; beside ratings.csv(.gz) it is MovieLens.
    assert resolve_feature_format(FeatureSource(str(path))) == "csv"
    (tmp_path / "ratings.csv.gz").write_bytes(b"")
    assert resolve_feature_format(FeatureSource(str(path))) == "movielens"
    assert read_item_features(FeatureSource(str(path))) == {
        "1": ["genre=Adventure", "genre=Animation"],
        "193609": ["genre=Comedy"],
    }


def test_jsonl_scalars_lists_and_sparse_lines(write_file):
    path = write_file(
        "items.jsonl",
        '{"item": 12, "brand": "acme", "tags": ["a", "b", "a"], "price_band": 3}\n'
        "\n"
        '{"item": "B00X", "tags": [], "brand": null, "new": true}\n'
        '{"item": 7, "tags": "c"}\n',
    )
    assert read_item_features(FeatureSource(str(path))) == {
        "12": ["brand=acme", "tags=a", "tags=b", "price_band=3"],
        "B00X": ["new=true"],
        "7": ["tags=c"],
    }
    gz = write_file("items.jsonl.gz", '{"id": "9", "genre": ["x"]}\n')
    assert read_item_features(FeatureSource(str(gz), item_column="id")) == {"9": ["genre=x"]}


def test_jsonl_named_columns_in_the_order_named(write_file):
    path = write_file(
        "items.json",
        '{"item": 1, "brand": "acme", "tags": ["a", "b"], "other": 5}\n{"item": 2, "tags": "c"}\n',
    )
    assert read_item_features(FeatureSource(str(path), columns=["tags", "brand"])) == {
        "1": ["tags=a", "tags=b", "brand=acme"],
        "2": ["tags=c"],
    }


def test_csv_cells_with_several_values(write_file):
    path = write_file(
        "items.csv",
        "item,genre,studio\n1,Drama|Comedy|Drama, Pixar \n2,Comedy,\n\n3,,A|B\n",
    )
    assert read_item_features(FeatureSource(str(path))) == {
        "1": ["genre=Drama", "genre=Comedy", "studio=Pixar"],
        "2": ["genre=Comedy"],
        "3": ["studio=A", "studio=B"],
    }
    whole = read_item_features(FeatureSource(str(path), value_sep=None))
    assert whole == {
        "1": ["genre=Drama|Comedy|Drama", "studio=Pixar"],
        "2": ["genre=Comedy"],
        "3": ["studio=A|B"],
    }


def test_tsv_and_gzipped_csv(write_file):
    tsv = write_file("items.tsv", "sku\tcolour\tsize\nB01\tred;blue\tL\nB02\tred\tM\n")
    source = FeatureSource(str(tsv), item_column="sku", sep="\t", value_sep=";")
    assert resolve_feature_format(source) == "csv"
    assert read_item_features(source) == {
        "B01": ["colour=red", "colour=blue", "size=L"],
        "B02": ["colour=red", "size=M"],
    }
    gz = write_file("items.csv.gz", "item,genre\n5,x|y\n")
    assert read_item_features(FeatureSource(str(gz))) == {"5": ["genre=x", "genre=y"]}


def test_parquet_with_a_list_column(tmp_path):
    path = tmp_path / "items.parquet"
    pd.DataFrame(
        {
            "item_id": [3, 1, 2],
            "category": [["a", "b", "a"], ["c"], []],
            "brand": ["x", None, "y"],
            "year": [2001, 2002, 2003],
        }
    ).to_parquet(path)
    source = FeatureSource(str(path), item_column="item_id", columns=("category", "brand"))
    assert resolve_feature_format(source) == "parquet"
    assert read_item_features(source) == {
        "3": ["category=a", "category=b", "brand=x"],
        "1": ["category=c"],
        "2": ["brand=y"],
    }
    every = read_item_features(FeatureSource(str(path), item_column="item_id"))
    assert every["1"] == ["category=c", "year=2002"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Beauty_item2attributes.json", "s3rec"),
        ("u.item", "movielens"),
        ("movies.dat", "movielens"),
        ("features.json", "jsonl"),
        ("features.jsonl.gz", "jsonl"),
        ("features.CSV", "csv"),
        ("features.tsv.gz", "csv"),
        ("features.parquet", "parquet"),
    ],
)
def test_auto_format_by_file_name(tmp_path, name, expected):
    assert resolve_feature_format(FeatureSource(str(tmp_path / name))) == expected
    assert resolve_feature_format(FeatureSource(str(tmp_path / name), format="csv")) == "csv"


# -- aligning with a catalogue ------------------------------------------------------------------


RAW = {
    "10": ["genre=b", "genre=a"],
    "30": ["brand=z"],
    "99": ["genre=a", "brand=y"],  # not in the catalogue
    "7": ["genre=c"],  # not in the catalogue
}


def test_align_rows_follow_catalogue_indices():
    item_ids = np.asarray([-1, 30, 20, 10])  # index 0 padding; item 20 has no features
    features = align_item_features(RAW, item_ids, "f.json")
    assert list(features.vocabulary) == ["", "brand=y", "brand=z", "genre=a", "genre=b", "genre=c"]
    assert features.num_attributes() == 5 and features.num_items == 3
    assert rows_of(features) == [
        [],  # padding
        ["brand=z"],  # item 30
        [],  # item 20
        ["genre=a", "genre=b"],  # item 10 (indices ascend within a row)
        ["genre=c"],  # extra: 7 before 99 (by integer id)
        ["brand=y", "genre=a"],
    ]
    assert list(features.extra_item_ids) == ["7", "99"]
    assert features.offsets.dtype == np.int64 and features.values.dtype == np.int32
    assert features.values.min() >= 1
    assert features.stats == {
        "items_with_features": 2,
        "items_without_features": 1,
        "extra_items": 2,
        "attributes": 5,
        "mean_attributes_per_item": 1.5,
    }


def test_align_matches_int_and_str_ids_alike():
    from_ints = align_item_features(RAW, np.asarray([-1, 30, 20, 10], dtype=np.int64), "f")
    from_strs = align_item_features(RAW, np.asarray(["", "30", "20", "10"]), "f")
    assert rows_of(from_ints) == rows_of(from_strs)
    assert np.array_equal(from_ints.offsets, from_strs.offsets)


def test_vocabulary_does_not_depend_on_row_order(tmp_path):
    lines = [json.dumps({"item": i, "tag": [f"t{(i * 7 + k) % 13}" for k in range(3)]}) for i in range(1, 40)]
    item_ids = np.arange(0, 30)  # items 30..39 become extras
    results = []
    for seed in (0, 1):
        random.Random(seed).shuffle(lines)
        path = tmp_path / f"shuffled{seed}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        results.append(align_item_features(read_item_features(FeatureSource(str(path))), item_ids, str(path)))
    first, second = results
    assert list(first.vocabulary) == list(second.vocabulary)
    assert np.array_equal(first.values, second.values) and np.array_equal(first.offsets, second.offsets)
    assert list(first.extra_item_ids) == [str(i) for i in range(30, 40)]


def test_save_load_round_trip(tmp_path):
    features = align_item_features(RAW, np.asarray(["", "30", "20", "10"]), "f")
    features.save(tmp_path / "features")
    loaded = ItemFeatures.load(tmp_path / "features")
    for name in ("offsets", "values", "vocabulary", "extra_item_ids"):
        saved, back = getattr(features, name), getattr(loaded, name)
        assert np.array_equal(saved, back) and saved.dtype == back.dtype, name
    assert loaded.num_items == features.num_items and loaded.stats == features.stats
    # Nothing of it needs pickle.
    for file in (tmp_path / "features").glob("*.npy"):
        np.load(file, allow_pickle=False)


def test_a_failed_save_leaves_no_directory(tmp_path, monkeypatch):
    features = align_item_features(RAW, np.asarray(["", "30"]), "f")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        features.save(tmp_path / "features")
    assert os.listdir(tmp_path) == []


# -- errors -------------------------------------------------------------------------------------


def test_file_and_format_errors(tmp_path):
    missing = tmp_path / "nope_item2attributes.json"
    one_line_error(
        rf"^{re.escape(str(missing))}: item feature file not found",
        read_item_features,
        FeatureSource(str(missing)),
    )
    one_line_error(
        rf"^{re.escape(str(tmp_path))}: is a directory",
        read_item_features,
        FeatureSource(str(tmp_path), "s3rec"),
    )
    one_line_error(
        r"^data\.item_features\.format: 'x' is not one of \['auto', 's3rec', 'movielens', 'jsonl', 'csv', 'parquet'\]$",
        read_item_features,
        FeatureSource(str(missing), format="x"),
    )
    one_line_error(
        r"features\.xml: cannot tell the item-feature format .*data\.item_features\.format",
        resolve_feature_format,
        FeatureSource(str(tmp_path / "features.xml")),
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ('[["1", [2]]]', r": not one JSON object of lists \(S3-Rec: .*\); found a JSON list$"),
        ('{"1": [2], "2": 3}', r": not one JSON object of lists \(S3-Rec: .*\); item '2' has 3$"),
        ('{"1": [2], "7": []}', r": item '7' has an empty feature list$"),
        ('{"1": [2], "1": [3]}', r": item '1' appears twice"),
        ('{"1": [2]', r":1: malformed JSON \("),
        ('{"1": [2]}\n{"2": [3]}\n', r":2: malformed JSON \(Extra data.*format: jsonl$"),
        ('{"1": [[2]]}', r": item '1' has attribute \[2\], expected an integer or string id$"),
    ],
)
def test_s3rec_errors(tmp_path, text, message):
    path = tmp_path / "Bad_item2attributes.json"
    path.write_text(text)
    one_line_error(rf"^{re.escape(str(path))}{message}", read_item_features, FeatureSource(str(path)))


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"item": 1, "a": "x"}\n{"item": 2, "a": \n', r":2: malformed JSON line \("),
        (
            '{"item": 1, "a": "x"}\n[1, 2]\n',
            r":2: malformed JSON line \(expected an object, found a JSON list\)$",
        ),
        (
            '{"item": 1, "a": "x"}\n\n{"id": 2, "a": "y"}\n',
            r":3: no item field 'item' .*the line has \['id', 'a'\]$",
        ),
        ('{"item": 1, "a": "x"}\n{"item": 7, "a": []}\n', r":2: item '7' has an empty feature list$"),
        (
            '{"item": 1, "a": "x"}\n{"item": "1", "a": "y"}\n',
            r":2: item '1' appears twice \(first at line 1\)",
        ),
        (
            '{"item": 1, "a": [["x"]]}\n',
            r":1: field 'a' is \[\['x'\]\], expected a value or a list of values$",
        ),
        ('{"item": null, "a": "x"}\n', r":1: item field 'item' is None, expected an id$"),
    ],
)
def test_jsonl_errors(tmp_path, text, message):
    path = tmp_path / "items.jsonl"
    path.write_text(text)
    one_line_error(rf"^{re.escape(str(path))}{message}", read_item_features, FeatureSource(str(path)))


def test_jsonl_named_column_that_no_line_has(write_file):
    path = write_file("items.jsonl", '{"item": 1, "genre": "x"}\n')
    one_line_error(
        r": no line has field 'gnere' \(data\.item_features\.columns\)$",
        read_item_features,
        FeatureSource(str(path), columns=("genre", "gnere")),
    )


@pytest.mark.parametrize(
    "text, options, message",
    [
        (
            "id,genre\n1,x\n",
            {},
            r": missing column 'item' \(data\.item_features\.item_column\); the file has \['id', 'genre'\]$",
        ),
        (
            "item,genre\n1,x\n",
            {"columns": ("genre", "year")},
            r": missing column 'year' \(data\.item_features\.columns\); the file has \['item', 'genre'\]$",
        ),
        (
            "item\tgenre\n1\tx\n",
            {},
            r": missing column 'item' .*the file has \['item\\tgenre'\] \(check data\.item_features\.sep\)$",
        ),
        ("item,genre,year\n1,x,\n7,|,\n", {}, r":3: item '7' has an empty feature list$"),
        ("item,genre\n1,x\n\n2,y\n1,z\n", {}, r":5: item '1' appears twice \(first at line 2\)"),
        ("item,genre\n1,x\n,y\n", {}, r":3: malformed row: no item id in column 'item'$"),
        ("item\n1\n", {}, r": no attribute columns besides the item column 'item'$"),
        ("item,genre\n1,x,y\n", {}, r":2: malformed row: expected 2 fields \(as the header\), found 3$"),
        ("item,genre,genre\n1,x,y\n", {}, r":1: column 'genre' appears twice in the header$"),
        ("item::genre\n1::x::y\n", {"sep": "::"}, r":2: malformed row: expected 2 fields"),
        ("", {}, r": no rows \(expected a header and one row per item\)$"),
    ],
)
def test_csv_errors(tmp_path, text, options, message):
    path = tmp_path / "items.csv"
    path.write_text(text)
    one_line_error(
        rf"^{re.escape(str(path))}{message}", read_item_features, FeatureSource(str(path), **options)
    )


def test_parquet_errors(tmp_path):
    path = tmp_path / "items.parquet"
    pd.DataFrame({"item": [1, 2, 1], "tags": [["a"], ["b"], ["c"]]}).to_parquet(path)
    one_line_error(
        r" \(row 2\): item '1' appears twice \(first at row 0\)", read_item_features, FeatureSource(str(path))
    )
    one_line_error(
        r": missing column 'sku' \(data\.item_features\.item_column\); the file has \['item', 'tags'\]$",
        read_item_features,
        FeatureSource(str(path), item_column="sku"),
    )
    pd.DataFrame({"item": [1, 2], "tags": [["a"], []]}).to_parquet(path)
    one_line_error(
        r" \(row 1\): item '2' has an empty feature list$", read_item_features, FeatureSource(str(path))
    )
    path.write_text("not parquet")
    one_line_error(r": cannot be read as parquet \(", read_item_features, FeatureSource(str(path)))


def test_movielens_errors(tmp_path):
    path = write_u_item(tmp_path / "a", ["1|T|d||u|0|1|0|0", "2|T|d||u|0|1|0"])
    one_line_error(
        r"u\.item:2: malformed row: expected 9 '\|'-separated fields .*found 8$",
        read_item_features,
        FeatureSource(str(path)),
    )
    path = write_u_item(tmp_path / "b", ["1|T|d||u|0|1|0|yes"])
    one_line_error(
        r"u\.item:1: malformed row: genre flag 'yes', expected 0 or 1$",
        read_item_features,
        FeatureSource(str(path)),
    )
    (tmp_path / "b" / "u.genre").unlink()
    one_line_error(
        r"u\.genre: not found \(the genre names of u\.item", read_item_features, FeatureSource(str(path))
    )
    dat = tmp_path / "movies.dat"
    dat.write_text("1::Toy Story::Comedy\n2::Broken\n")
    one_line_error(
        r"movies\.dat:2: malformed row: expected 3 '::'-separated fields",
        read_item_features,
        FeatureSource(str(dat)),
    )
    other = tmp_path / "films.txt"
    other.write_text("1|x\n")
    one_line_error(
        r"films\.txt: unknown MovieLens item file", read_item_features, FeatureSource(str(other), "movielens")
    )


def test_option_errors(write_file):
    path = write_file("items.csv", "item,genre\n1,x\n")
    one_line_error(
        r"^data\.item_features\.columns: 'item' is the item column",
        read_item_features,
        FeatureSource(str(path), columns=("item",)),
    )
    one_line_error(
        r"^data\.item_features\.columns: empty", read_item_features, FeatureSource(str(path), columns=())
    )
    one_line_error(r"^data\.item_features\.path: required", FeatureSource, "")


def test_align_refuses_a_file_of_another_data_set():
    one_line_error(
        r"^feats\.json: none of its 2 item ids is an item of the interactions \(e\.g\. 'B01'\); "
        r"is data\.item_features the file of this data set\?$",
        align_item_features,
        {"B01": ["a=1"], "B02": ["a=2"]},
        np.asarray([-1, 1, 2, 3]),
        "feats.json",
    )


# -- fingerprint --------------------------------------------------------------------------------


def test_describe_follows_bytes_and_options_not_the_path(tmp_path):
    first = tmp_path / "a" / "items.csv"
    first.parent.mkdir()
    first.write_text("item,genre\n1,x|y\n")
    described = FeatureSource(str(first)).describe()
    assert described["format"] == "csv" and set(described) == {
        "format",
        "item_column",
        "columns",
        "sep",
        "value_sep",
        "sha256",
    }
    assert str(first) not in json.dumps(described)
    moved = tmp_path / "b" / "renamed.csv"
    moved.parent.mkdir()
    first.rename(moved)
    assert FeatureSource(str(moved)).describe() == described
    assert FeatureSource(str(moved), format="csv").describe() == described  # auto resolves to the same
    for option in ({"value_sep": None}, {"columns": ("genre",)}, {"sep": ";"}, {"item_column": "genre"}):
        assert FeatureSource(str(moved), **option).describe() != described, option
    moved.write_text("item,genre\n1,x|z\n")
    assert FeatureSource(str(moved)).describe()["sha256"] != described["sha256"]
    # The S3-Rec file reads no options: they do not enter its description.
    s3rec = tmp_path / "X_item2attributes.json"
    s3rec.write_text('{"1": [1]}')
    assert set(FeatureSource(str(s3rec), sep=";").describe()) == {"format", "sha256"}


def test_describe_of_u_item_follows_u_genre(tmp_path):
    path = write_u_item(tmp_path, ["1|T|d||u|0|1|0|0"])
    before = FeatureSource(str(path)).describe()
    (tmp_path / "u.genre").write_text(U_GENRE.replace("Action", "Adventure"))
    assert FeatureSource(str(path)).describe() != before


# -- the real files -----------------------------------------------------------------------------


def test_real_attribute_files():
    beauty = SHARED / "amazon_beauty" / "Beauty_item2attributes.json"
    if not beauty.exists():
        pytest.skip(f"{beauty} is not here")
    raw = read_item_features(FeatureSource(str(beauty)))
    features = align_item_features(raw, np.r_[-1, np.arange(1, 12102)], str(beauty))
    assert features.stats["items_with_features"] == 12101 and features.stats["items_without_features"] == 0
    assert features.stats["extra_items"] == 0 and features.num_attributes() == 637
    assert FORMATS[0] == "auto" and resolve_feature_format(FeatureSource(str(beauty))) == "s3rec"

    u_item = SHARED / "ml100k" / "u.item"
    if u_item.exists():
        genres = read_item_features(FeatureSource(str(u_item)))
        assert len(genres) == 1682
        assert len({token for tokens in genres.values() for token in tokens}) == 19
        assert genres["1"] == ["genre=Animation", "genre=Children's", "genre=Comedy"]  # Toy Story
