"""A labels CSV read by column name (data.id_column / data.label_column), as Kaggle ships them."""

import pytest

from tests.conftest import CLASSES, make_csv_dataset
from trainer.data.items import DataError, csv_items


def test_columns_by_name_in_any_order(tmp_path):
    root = make_csv_dataset(tmp_path / "d", n=12)
    rows = (root / "labels.csv").read_text().splitlines()[1:]
    (root / "train_v2.csv").write_text(
        "\n".join(["tags,notes,image_name", *[f"{r.split(',')[1]},x,{r.split(',')[0]}" for r in rows]]) + "\n"
    )
    items = csv_items(root, "train_v2.csv", suffix=".jpg", columns=("image_name", "tags"))
    plain = csv_items(root, "labels.csv", suffix=".jpg")  # the first two columns, as before
    assert items.classes == plain.classes == CLASSES
    assert items.train_files == plain.train_files and items.train_labels == plain.train_labels


def test_a_column_that_is_not_there_is_named_with_a_hint(tmp_path):
    root = make_csv_dataset(tmp_path / "d", n=12)
    with pytest.raises(
        DataError, match="no column 'lable' \\(data.label_column\\); its columns: id, label; did you mean"
    ):
        csv_items(root, suffix=".jpg", columns=(None, "lable"))
