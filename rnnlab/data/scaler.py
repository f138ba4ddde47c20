"""Standardisation of feature columns, fit on training rows and stored in a bundle as JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from rnnlab.errors import DataError


@dataclass
class Scaler:
    """Standardisation as sklearn's StandardScaler does it (population std; constant columns keep scale 1)."""

    mean: np.ndarray
    scale: np.ndarray
    columns: list[str]

    @classmethod
    def fit(cls, frame_or_array: pd.DataFrame | np.ndarray, columns: list[str] | None = None) -> Scaler:
        if isinstance(frame_or_array, pd.DataFrame):
            columns = list(columns) if columns is not None else [str(c) for c in frame_or_array.columns]
            values = frame_or_array[columns].to_numpy(dtype=np.float64)
        else:
            values = np.asarray(frame_or_array, dtype=np.float64)
            if values.ndim == 1:
                values = values[:, None]
            columns = list(columns) if columns is not None else [str(i) for i in range(values.shape[1])]
        if len(values) == 0:
            raise DataError("Cannot fit a scaler on zero rows; the training split is empty.")
        mean = values.mean(axis=0)
        scale = values.std(axis=0)
        scale[scale < 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)] = 1.0
        return cls(mean=mean, scale=scale, columns=columns)

    def _values(self, data: pd.DataFrame | np.ndarray) -> np.ndarray:
        if isinstance(data, pd.DataFrame):
            return data[self.columns].to_numpy(dtype=np.float64)
        return np.asarray(data, dtype=np.float64)

    def transform(self, array: pd.DataFrame | np.ndarray) -> np.ndarray:
        values = self._values(array)
        if values.ndim == 1 and len(self.columns) == 1:
            return (values - self.mean[0]) / self.scale[0]
        return (values - self.mean) / self.scale

    def inverse_transform(self, array: np.ndarray) -> np.ndarray:
        values = np.asarray(array, dtype=np.float64)
        if values.ndim == 1 and len(self.columns) == 1:
            return values * self.scale[0] + self.mean[0]
        return values * self.scale + self.mean

    def to_json(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Scaler:
        try:
            columns = [str(c) for c in d["columns"]]
            mean = np.asarray(d["mean"], dtype=np.float64)
            scale = np.asarray(d["scale"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"Scaler JSON is malformed ({exc}); it needs columns, mean and scale lists.") from exc
        if not (len(columns) == mean.shape[0] == scale.shape[0]) or mean.ndim != 1 or scale.ndim != 1:
            raise DataError("Scaler JSON has columns, mean and scale of different lengths; re-export the bundle.")
        return cls(mean=mean, scale=scale, columns=columns)
