import numpy as np
import pandas as pd
import pytest

from recsys.data import loaders
from recsys.data.formats import Source, read_interactions, resolve_format
from recsys.errors import UserInputError


@pytest.mark.parametrize("name", ["seq.txt", "seq.txt.gz"])
def test_sequence_file_plain_and_gzipped(write_file, name):
    path = write_file(name, "1 10 11 12\n2 11 13 10 14\n\n")
    frame = loaders.read_sequence_file(path).frame()
    assert frame["user"].tolist() == [1, 1, 1, 2, 2, 2, 2]
    assert frame["item"].tolist() == [10, 11, 12, 11, 13, 10, 14]
    assert frame["timestamp"].tolist() == [0, 1, 2, 0, 1, 2, 3]  # position in the line


def test_sequence_file_string_ids(write_file):
    frame = loaders.read_sequence_file(write_file("s.txt", "alice B0001 B0002 B0003\n")).frame()
    assert frame["item"].tolist() == ["B0001", "B0002", "B0003"]


def test_sequence_file_malformed_rows_name_the_line(write_file):
    with pytest.raises(UserInputError, match=r"bad\.txt:2: malformed row: user '2' has no items"):
        loaders.read_sequence_file(write_file("bad.txt", "1 10 11\n2\n"))
    with pytest.raises(UserInputError, match=r"dup\.txt:3: .*user '1' already appeared on line 1"):
        loaders.read_sequence_file(write_file("dup.txt", "1 10 11\n2 3 4\n1 5 6\n"))
    with pytest.raises(UserInputError, match=r"item 'x9' is not an integer id"):
        loaders.read_sequence_file(write_file("mixed.txt", "1 10 11\n2 3 x9\n"))


def test_missing_and_empty_files(tmp_path, write_file):
    with pytest.raises(UserInputError, match=r"nope\.txt: data file not found"):
        loaders.read_sequence_file(tmp_path / "nope.txt")
    with pytest.raises(UserInputError, match=r"empty\.txt: no rows"):
        loaders.read_sequence_file(write_file("empty.txt", "\n"))
    with pytest.raises(UserInputError, match="is a directory"):
        loaders.read_sequence_file(tmp_path)


def test_movielens_dat(write_file):
    path = write_file(
        "ml/ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n"
    )
    frame = loaders.read_movielens(path).frame()
    assert list(frame.columns) == ["user", "item", "rating", "timestamp"]
    assert frame["item"].tolist() == [1193, 661, 1193]
    assert frame["rating"].tolist() == [5.0, 3.0, 4.0]
    assert frame["timestamp"].dtype == np.int64


def test_movielens_100k_gzipped(write_file):
    path = write_file("ml100k/u.data.gz", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    frame = loaders.read_movielens(path).frame()
    assert frame["user"].tolist() == [196, 186]
    assert resolve_format("auto", str(path)) == "movielens"


def test_movielens_csv_with_header(write_file):
    path = write_file(
        "latest/ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n"
    )
    frame = loaders.read_movielens(path).frame()
    assert frame["rating"].tolist() == [4.0, 4.5]


def test_movielens_malformed_row_has_line_number(write_file):
    path = write_file("m/ratings.dat", "1::1193::5::978300760\n1::661::3\n")
    with pytest.raises(
        UserInputError,
        match=r"ratings\.dat:2: malformed row: expected 4 fields \(user, item, rating, timestamp\), found 3",
    ):
        loaders.read_movielens(path)
    path = write_file("m1/ratings.dat", "1::1193::5::978300760\n1::661::3::9::9\n")
    with pytest.raises(UserInputError, match=r"ratings\.dat:2: malformed row: expected 4 fields .*found 5"):
        loaders.read_movielens(path)
    path = write_file(
        "m2/ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,abc,964981247\n"
    )
    with pytest.raises(UserInputError, match=r"ratings\.csv:3: malformed row: column 'rating' is 'abc'"):
        loaders.read_movielens(path)


def test_interactions_csv_with_mapping_and_datetimes(write_file):
    path = write_file(
        "events.csv.gz",
        "visitor,product,when,kind\nv1,p1,2020-01-02 10:00:00,view\nv1,p2,2020-01-01 09:00:00,buy\n",
    )
    frame = loaders.read_interactions_file(
        path, {"user": "visitor", "item": "product", "timestamp": "when", "event": "kind"}
    ).frame()
    assert frame["user"].tolist() == ["v1", "v1"]
    assert frame["event"].tolist() == ["view", "buy"]
    assert frame["timestamp"].iloc[0] > frame["timestamp"].iloc[1]


def test_interactions_without_timestamp_use_file_order(write_file):
    frame = loaders.read_interactions_file(
        write_file("e.tsv", "u\ti\n1\t5\n1\t6\n"), {"user": "u", "item": "i"}, sep="\t"
    ).frame()
    assert frame["timestamp"].tolist() == [0, 1]


def test_interactions_parquet(tmp_path):
    path = tmp_path / "events.parquet"
    pd.DataFrame({"uid": [1, 1, 2], "iid": [7, 8, 7], "ts": [3, 4, 5]}).to_parquet(path)
    frame = loaders.read_interactions_file(path, {"user": "uid", "item": "iid", "timestamp": "ts"}).frame()
    assert frame["item"].tolist() == [7, 8, 7]
    assert resolve_format("auto", str(path)) == "interactions"


def test_interactions_missing_column_is_named(write_file):
    path = write_file("e.csv", "user,item\n1,2\n")
    with pytest.raises(UserInputError, match=r"e\.csv: missing column 'time' \(data\.columns\.timestamp\)"):
        loaders.read_interactions_file(path, {"user": "user", "item": "item", "timestamp": "time"})
    with pytest.raises(UserInputError, match=r"data\.columns: unknown key\(s\) \['itme'\]"):
        loaders.read_interactions_file(path, {"user": "user", "item": "item", "itme": "x"})


def test_interactions_bad_timestamp_names_line(write_file):
    path = write_file("e.csv", "user,item,ts\n1,2,5\n1,3,not-a-time\n")
    with pytest.raises(UserInputError, match=r"e\.csv:3: malformed row: column 'ts'"):
        loaders.read_interactions_file(path, {"user": "user", "item": "item", "timestamp": "ts"})


def test_sequence_times_come_from_a_parallel_file(write_file):
    items = write_file("s.txt", "1 10 11 12\n2 13 10\n")
    times = write_file("t.txt.gz", "1 100 100 250\n2 50 60\n")
    frame = loaders.read_sequence_file(items, times_path=times).frame()
    assert frame["timestamp"].tolist() == [100, 100, 250, 50, 60]
    for text, message in (
        ("1 100 100 250\n3 50 60\n", r"t2\.txt:2: user '3', where .*s\.txt has user '2'"),
        ("1 100 100\n2 50 60\n", r"t2\.txt:1: 2 times for user '1', who has 3 items"),
        ("1 100 100 250\n", r"t2\.txt: fewer lines than .*s\.txt has users \(2\)"),
        ("1 100 100 250\n2 50 later\n", r"t2\.txt: time 'later' is not a number"),
    ):
        with pytest.raises(UserInputError, match=message):
            loaders.read_sequence_file(items, times_path=write_file("t2.txt", text))
    with pytest.raises(
        UserInputError, match=r"^data\.times_path: only data\.format=sequence reads one, not 'movielens'$"
    ):
        read_interactions(
            Source("movielens", str(write_file("u.data", "1\t2\t3\t4\n")), times_path=str(times))
        )
