"""Strategy clusters of one class's maps: Spectral Relevance Analysis (SpRAy).

Following Lapuschkin et al. (Nature Communications 10:1096, 2019) and the
CoRelAy pipeline: the class's pooled unit-mass maps (a bounded sample) are
compared by cosine distance, a symmetric k-nearest-neighbour graph is built,
its normalised Laplacian's smallest eigenvalues give the number of clusters
(the eigengap among 2 to :data:`MAX_CLUSTERS` largest against the eigenvalue
above it, if at least :data:`MIN_RELATIVE_GAP` of it; else one), and k-means on the
spectral embedding (rows scaled to unit length) assigns the maps. A class
whose maps follow one strategy gives one cluster; a class where part of the
images is recognised by something else (a tag, a watermark) gives two or more,
with a large eigengap.

Deterministic: the graph and the eigenvectors depend only on the maps, and
k-means is seeded.

Example:
>>> result = strategy_clusters(maps, keys, seed=0)
>>> result.count, [cluster.size for cluster in result.clusters]
"""

from __future__ import annotations

import dataclasses

import numpy as np

MAX_CLUSTERS = 8
#: Neighbours of each map in the affinity graph (fewer for small samples).
NEIGHBOURS = 10
#: Samples below this size are one cluster (too few for a graph).
MIN_MAPS = 12
#: A gap after the k-th eigenvalue counts when it is at least this share of the (k+1)-th eigenvalue.
MIN_RELATIVE_GAP = 0.5
#: k-means runs from different seeded starts; the one with the least inertia is kept.
KMEANS_RESTARTS = 10
#: Exemplars listed per cluster: the maps nearest its centre.
EXEMPLARS = 8


@dataclasses.dataclass
class Cluster:
    """One strategy.

    Attributes:
        size: maps in it.
        share: its share of the class's sample.
        mean: float64 ``[rows, columns]``, the mean of its unit-mass maps.
        exemplars: keys of the maps nearest its centre in the embedding.
        members: indices of its maps in the sample.
    """

    size: int
    share: float
    mean: np.ndarray
    exemplars: list
    members: np.ndarray


@dataclasses.dataclass
class Clusters:
    """The strategies of one class.

    Attributes:
        count: the number of clusters chosen.
        eigengap: the gap that chose it (0 for one cluster from a sample too small for a graph).
        eigenvalues: the smallest eigenvalues of the normalised Laplacian.
        clusters: largest first.
        labels: the cluster of each map of the sample (indices into ``clusters``).
    """

    count: int
    eigengap: float
    eigenvalues: list
    clusters: list
    labels: np.ndarray


def _one(maps: np.ndarray, keys: list) -> Clusters:
    members = np.arange(len(maps))
    mean = maps.mean(axis=0) if len(maps) else np.zeros(maps.shape[1:])
    return Clusters(count=1, eigengap=0.0, eigenvalues=[],
                    clusters=[Cluster(size=len(maps), share=1.0, mean=mean, exemplars=list(keys[:EXEMPLARS]),
                                      members=members)],
                    labels=np.zeros(len(maps), int))


def knn_affinity(features: np.ndarray, neighbours: int) -> np.ndarray:
    """The symmetric k-nearest-neighbour graph of ``features`` ``[n, d]`` by cosine similarity (0, 0.5 or 1).

    Each row is linked to its ``neighbours`` most similar other rows (ties: the
    lower index first); the graph is averaged with its transpose, so a link
    both ways weighs 1 and a link one way 0.5.
    """
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = np.divide(features, norms, out=np.zeros_like(features), where=norms > 0)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :neighbours]
    graph = np.zeros_like(similarity)
    np.put_along_axis(graph, nearest, 1.0, axis=1)
    return 0.5 * (graph + graph.T)


def kmeans(points: np.ndarray, clusters: int, seed: int, restarts: int = KMEANS_RESTARTS) -> tuple:
    """k-means (k-means++ starts, seeded), the best of ``restarts`` runs: ``(centres, label of each point)``."""
    from scipy.cluster.vq import kmeans2

    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        centres, labels = kmeans2(points, clusters, minit="++", seed=rng)
        inertia = float(np.sum((points - centres[labels]) ** 2))
        if best is None or inertia < best[0]:
            best = (inertia, centres, labels)
    return best[1], best[2]


def strategy_clusters(maps: np.ndarray, keys: list, seed: int = 0, max_clusters: int = MAX_CLUSTERS,
                      neighbours: int = NEIGHBOURS) -> Clusters:
    """Clusters one class's maps by the strategy they show.

    Args:
        maps: float ``[n, rows, columns]``, unit-mass pooled maps of one class.
        keys: the n maps' keys.
        seed: seeds k-means.
        max_clusters: the most clusters considered.
        neighbours: the k of the k-nearest-neighbour graph.

    Returns:
        The :class:`Clusters`.
    """
    from scipy.linalg import eigh
    from scipy.sparse.csgraph import laplacian

    maps = np.asarray(maps, np.float64)
    count = len(maps)
    if count < MIN_MAPS:
        return _one(maps, keys)
    considered = min(max_clusters, count - 1)
    normalised = laplacian(knn_affinity(maps.reshape(count, -1), min(neighbours, count - 1)), normed=True)
    # only the smallest eigenpairs are needed: a subset solver, not the full decomposition
    eigenvalues, eigenvectors = eigh(normalised, subset_by_index=[0, considered])
    values = np.clip(eigenvalues, 0.0, None)
    gaps = np.diff(values)
    # k clusters when the gap after the k-th eigenvalue is large against the (k+1)-th: maps that form k groups
    # give k eigenvalues near 0, then a jump. A continuum of strategies (e.g. the object anywhere in the image)
    # gives slowly growing eigenvalues, whose largest absolute gap would pick an arbitrary k: one cluster then.
    relative = np.divide(gaps, values[1:], out=np.zeros_like(gaps), where=values[1:] > 0)
    chosen = int(np.argmax(relative[1:])) + 2 if considered >= 2 else 1
    if considered < 2 or relative[chosen - 1] < MIN_RELATIVE_GAP:
        result = _one(maps, keys)
        result.eigengap, result.eigenvalues = float(gaps[0]), [float(value) for value in values]
        return result
    embedding = eigenvectors[:, :chosen]
    lengths = np.linalg.norm(embedding, axis=1, keepdims=True)
    embedding = np.divide(embedding, lengths, out=np.zeros_like(embedding), where=lengths > 0)
    centres, assigned = kmeans(embedding, chosen, seed)
    order = np.argsort(-np.bincount(assigned, minlength=chosen), kind="stable")
    relabel = np.empty(chosen, int)
    relabel[order] = np.arange(chosen)
    labels = relabel[assigned]
    clusters = []
    for index, original in enumerate(order):
        members = np.flatnonzero(labels == index)
        distance = np.linalg.norm(embedding[members] - centres[original], axis=1)
        nearest = members[np.argsort(distance, kind="stable")[:EXEMPLARS]]
        clusters.append(Cluster(size=len(members), share=len(members) / count, mean=maps[members].mean(axis=0),
                                exemplars=[keys[member] for member in nearest], members=members))
    return Clusters(count=chosen, eigengap=float(gaps[chosen - 1]),
                    eigenvalues=[float(value) for value in values], clusters=clusters,
                    labels=labels)
