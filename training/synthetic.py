"""A seeded synthetic movie dataset in the CoLLM split format, for the demo and for tests.

Users have latent tastes over a few genres and latent factors that no title shows; items
have a genre, a quality and latent factors, and their titles carry their genre words
("Midnight Ghost Manor (Horror, 1987)"). Whether a user likes an item mixes the genre
taste (visible to an LLM through the titles) with the latent match and the quality
(visible only collaboratively), so both signals are there to learn.

Interactions happen in time: each user is active from a start time on and meets items
already released, one at a time. The split is chronological (the first `n_train` events
are train, the rest valid), so users who start late and items released late are cold in
valid, as in the real CoLLM splits. `his` holds the user's earlier liked items across
splits, oldest first, with the leading 0 pad (`his_title` with a leading '') of the
CoLLM parquet files; `not_cold` is 1 where user and item both occur in train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sellarec.training.data import Dataset

#: Genre -> (title openers, title endings); every title of a genre draws one of each.
GENRES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Horror": (
        ("Midnight", "Haunted", "Cursed", "Bloody", "Silent", "Hollow"),
        ("Ghost Manor", "Graveyard", "Nightmare", "Crypt", "Shadows", "Possession"),
    ),
    "Comedy": (
        ("Crazy", "Wacky", "Lucky", "Silly", "Big Fat", "Totally"),
        ("Wedding", "Road Trip", "Roommates", "Vacation", "Office Party", "Family Reunion"),
    ),
    "Sci-Fi": (
        ("Galactic", "Quantum", "Cosmic", "Robot", "Starship", "Martian"),
        ("Odyssey", "Frontier", "Invasion", "Colony", "Signal", "Paradox"),
    ),
    "Romance": (
        ("Paris", "Summer", "Secret", "Endless", "Sweet", "Moonlit"),
        ("Love Letters", "Kiss", "Heartbeat", "Promise", "Valentine", "Serenade"),
    ),
    "Western": (
        ("Dusty", "Outlaw", "Lonesome", "Iron", "Desert", "Dead Man's"),
        ("Saloon", "Sheriff", "Gunslinger", "Canyon", "Stagecoach", "Ranch"),
    ),
    "Animation": (
        ("Little", "Magic", "Brave", "Tiny", "Dancing", "Enchanted"),
        ("Dragon", "Kingdom", "Puppy", "Toybox", "Forest Friends", "Balloon"),
    ),
}
#: First timestamp (seconds), and the span the events cover (about a year).
EPOCH, SPAN = 975_000_000, 365 * 24 * 3600
#: Dimension of the latent factors that titles do not show.
LATENT_DIM = 4


@dataclass(frozen=True)
class SyntheticSpec:
    """The size and mix of a synthetic dataset; the same spec and seed give the same rows."""

    #: Users, ids 1..n_users (0 is unused, like the pad).
    n_users: int = 100
    #: Items, ids 1..n_items (0 is the pad).
    n_items: int = 120
    #: Interactions in train (the earliest ones).
    n_train: int = 3000
    #: Interactions in valid (the later ones).
    n_valid: int = 600
    #: Genres used, the first ones of GENRES.
    n_genres: int = 6
    #: Share of users who start late (mostly after the split: cold users).
    cold_users: float = 0.1
    #: Share of items released late (mostly after the split: cold items).
    cold_items: float = 0.03
    #: Weight of the genre taste in the like logit (the signal titles carry).
    genre_weight: float = 3.0
    #: Weight of each genre's appeal to everyone (spread evenly over [-1, 1] across genres).
    genre_appeal: float = 1.5
    #: Weight of the latent match and quality (the signal only interactions carry).
    collab_weight: float = 2.0
    #: Seed of everything.
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.n_genres <= len(GENRES):
            raise ValueError(f"n_genres must be in 1..{len(GENRES)}")
        per_genre = -(-self.n_items // self.n_genres)
        most = min(len(o) * len(e) for o, e in GENRES.values())
        if per_genre > most:
            raise ValueError(f"at most {most * self.n_genres} items with {self.n_genres} genres")
        if self.n_train < 1 or self.n_valid < 1:
            raise ValueError("n_train and n_valid must be positive")
        if self.n_train + self.n_valid > self.n_users * self.n_items * 3 // 4:
            raise ValueError("too many interactions for the users and items (at most 3/4 of all pairs)")


@dataclass
class World:
    """The latent truth behind a synthetic dataset (tests and the demo's hints read it)."""

    #: Title of each item id (index 0 is the pad, '').
    titles: list[str]
    #: Genre name of each item id (index 0: '').
    genres: list[str]
    #: The genres in use, in the column order of `taste`.
    genre_names: list[str]
    #: [n_users + 1, n_genres] each user's taste (rows sum to 1; row 0 unused).
    taste: np.ndarray
    #: [n_users + 1, n_items + 1] log-odds that a user likes an item (the truth labels are drawn from).
    logits: np.ndarray
    #: [n_users + 1] start time of each user in [0, 1).
    user_start: np.ndarray
    #: [n_items + 1] release time of each item in [0, 1).
    item_release: np.ndarray


def _count(share: float, n: int) -> int:
    """At least one when the share is positive, so that small datasets still have cold ids."""
    return 0 if share <= 0 else max(1, round(share * n))


def make_world(spec: SyntheticSpec, rng: np.random.Generator) -> World:
    """Items, users, their tastes and the like logits of every (user, item) pair."""
    names = list(GENRES)[: spec.n_genres]
    genre_of = np.zeros(spec.n_items + 1, dtype=np.int64)
    genre_of[1:] = rng.permutation(np.arange(spec.n_items) % spec.n_genres)
    titles, genres = [""], [""]
    combos = {g: rng.permutation(len(GENRES[g][0]) * len(GENRES[g][1])) for g in names}
    used = dict.fromkeys(names, 0)
    for i in range(1, spec.n_items + 1):
        g = names[genre_of[i]]
        openers, endings = GENRES[g]
        k = int(combos[g][used[g]])
        used[g] += 1
        year = int(rng.integers(1950, 2000))
        titles.append(f"{openers[k // len(endings)]} {endings[k % len(endings)]} ({g}, {year})")
        genres.append(g)
    taste = rng.dirichlet(np.full(spec.n_genres, 0.4), size=spec.n_users + 1)
    users_latent = rng.normal(size=(spec.n_users + 1, LATENT_DIM))
    items_latent = rng.normal(size=(spec.n_items + 1, LATENT_DIM))
    quality = rng.normal(scale=0.6, size=spec.n_items + 1)
    genre_term = np.clip(spec.n_genres * taste[:, genre_of] - 1.0, -1.0, 2.0)
    collab_term = users_latent @ items_latent.T / np.sqrt(LATENT_DIM) + quality[None, :]
    appeal = rng.permutation(np.linspace(-1.0, 1.0, spec.n_genres))[genre_of]
    logits = (
        spec.genre_weight * genre_term
        + spec.genre_appeal * appeal[None, :]
        + spec.collab_weight * collab_term
    )
    logits -= np.median(logits[1:, 1:])  # about half of random pairs are liked
    user_start = rng.uniform(0.0, 0.5, size=spec.n_users + 1)
    late_users = rng.choice(np.arange(1, spec.n_users + 1), _count(spec.cold_users, spec.n_users), False)
    user_start[late_users] = rng.uniform(0.9, 0.95, size=len(late_users))
    item_release = np.zeros(spec.n_items + 1)
    late_items = rng.choice(np.arange(1, spec.n_items + 1), _count(spec.cold_items, spec.n_items), False)
    item_release[late_items] = rng.uniform(0.85, 0.9, size=len(late_items))
    return World(
        titles=titles,
        genres=genres,
        genre_names=names,
        taste=taste,
        logits=logits,
        user_start=user_start,
        item_release=item_release,
    )


def _events(spec: SyntheticSpec, world: World, rng: np.random.Generator) -> list[tuple]:
    """(time, user, item, label) in time order; each user meets each item at most once."""
    wanted = spec.n_train + spec.n_valid
    activity = rng.lognormal(sigma=0.6, size=spec.n_users + 1)
    activity[0] = 0.0
    # Late users get their share of events inside their shorter window.
    activity *= 1.0 - world.user_start
    users = rng.choice(spec.n_users + 1, size=4 * wanted, p=activity / activity.sum())
    times = rng.uniform(world.user_start[users], 1.0)
    order = np.argsort(times, kind="stable")
    seen: dict[int, set[int]] = {}
    events = []
    for k in order:
        u, t = int(users[k]), float(times[k])
        fresh = [i for i in np.flatnonzero(world.item_release <= t) if i > 0 and i not in seen.get(u, ())]
        if not fresh:
            continue
        i = int(rng.choice(fresh))
        seen.setdefault(u, set()).add(i)
        label = int(rng.random() < 1.0 / (1.0 + np.exp(-world.logits[u, i])))
        events.append((t, u, i, label))
    if len(events) < wanted:
        raise ValueError("could not draw enough interactions; lower n_train + n_valid")
    keep = np.sort(rng.choice(len(events), size=wanted, replace=False))
    return [events[k] for k in keep]


def synthetic_frames(spec: SyntheticSpec = SyntheticSpec()) -> tuple[pd.DataFrame, pd.DataFrame, World]:
    """(train, valid, world): CoLLM-format frames with padded histories, split in time."""
    rng = np.random.default_rng(spec.seed)
    world = make_world(spec, rng)
    rows = []
    liked: dict[int, list[int]] = {}
    for t, u, i, label in _events(spec, world, rng):
        his = liked.get(u, [])
        rows.append(
            {
                "uid": u,
                "iid": i,
                "label": label,
                "timestamp": EPOCH + int(t * SPAN),
                "his": [0, *his],
                "his_title": ["", *[world.titles[h] for h in his]],
                "title": world.titles[i],
                "not_cold": 1,
            }
        )
        if label:
            liked.setdefault(u, []).append(i)
    frame = pd.DataFrame(rows)
    train = frame.iloc[: spec.n_train].reset_index(drop=True)
    valid = frame.iloc[spec.n_train :].reset_index(drop=True)
    seen_users, seen_items = set(train["uid"]), set(train["iid"])
    valid["not_cold"] = [int(u in seen_users and i in seen_items) for u, i in zip(valid["uid"], valid["iid"])]
    return train, valid, world


def write_splits(train: pd.DataFrame, valid: pd.DataFrame, out: str | Path) -> tuple[Path, Path]:
    """Write train.parquet and valid.parquet under `out` (list columns as parquet lists)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.parquet", out / "valid.parquet"
    for frame, path in zip((train, valid), paths):
        frame.to_parquet(path, index=False)
    return paths


def synthetic_dataset(
    n_users: int = 8, n_items: int = 14, n_train: int = 48, n_valid: int = 24, seed: int = 0
) -> Dataset:
    """A small `Dataset` for tests (defaults: seconds on a tiny backbone), cold ids included."""
    spec = SyntheticSpec(
        n_users=n_users,
        n_items=n_items,
        n_train=n_train,
        n_valid=n_valid,
        n_genres=min(6, n_items),
        seed=seed,
    )
    train, valid, _ = synthetic_frames(spec)
    return Dataset.from_frames(train, valid, name="synthetic")
