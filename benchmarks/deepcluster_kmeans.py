"""Cost and quality of deepcluster.py's k-means.

    python benchmarks/deepcluster_kmeans.py --device cuda   # one iteration, 1.28M x 256, k = 10,000
    python benchmarks/deepcluster_kmeans.py --device cpu    # against scikit-learn's KMeans
    OMP_NUM_THREADS=1 python benchmarks/deepcluster_kmeans.py --device cpu --against faiss --dim 128 --k 100

GPU: DeepCluster's ImageNet clustering size (1.28M L2-normalised 256-d features, k = 10,000). The
time of one iteration (assign every point + move the centroids + empty-cluster check) is
(T(21 iterations) - T(1 iteration)) / 20 of the real `deepcluster.kmeans`, median of --repeats,
CUDA synchronised, with TF32 matmuls on (as common.setup_device sets them) and off. Correctness:
on a subset, the centroid chosen for each point against a float64 argmin: the share of exact
matches and the share whose chosen centroid is more than 1e-5 farther than the best (a real error,
not a tie). Target: under 0.15 s per iteration on one H100.

CPU: the same clustering as scikit-learn's KMeans (Lloyd, n_init 1, tol 0, 20 iterations) on the same
features: (a) from the same initial centroids (k random points), where the two must agree, and (b)
each with its own k-means++ over --seeds seeds. Features: CIFAR-10 through a random Sobel
alexnet-small, PCA-whitened to --dim and L2-normalised (the Deep Dive's CIFAR-10 pipeline; needs
cifar10 under --data-dir), or --source random (a Gaussian mixture). scikit-learn is needed for this
part only (`pip install scikit-learn`); it is not a dependency of the project.

CPU, --against faiss: the time of the whole clustering as the official clustering.py runs it with
faiss-cpu (faiss.Clustering with all points, --iters iterations from the same initial centroids as ours,
then index.search for the final labels: --iters + 1 assignments, as `deepcluster.kmeans`), divided by
--iters; ours and faiss alternate --repeats times and the ratio is of the medians. Also the share of
points both put in the same cluster. --before FILE adds an older deepcluster.py's k-means to the
rotation (`git show REV:deepcluster.py > FILE`) and checks that it gives the same labels and centroids.
Threads: both follow OMP_NUM_THREADS (set it). faiss is needed for this part only (`pip install
faiss-cpu`); it is not a dependency of the project.
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import deepcluster  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def mixture(n, d, k, device, seed=0):
    """n L2-normalised points around k random centres (a stand-in for PCA-whitened features)."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(k, d, generator=g, device=device)
    noise = 0.7 * torch.randn(n, d, generator=g, device=device)
    x = centres[torch.randint(k, (n,), generator=g, device=device)] + noise
    return torch.nn.functional.normalize(x, dim=1)


def gpu_benchmark(args, device):
    x = mixture(args.n, args.dim, args.k, device)
    result = {"n": args.n, "dim": args.dim, "k": args.k, "device": torch.cuda.get_device_name(device)}
    for tf32 in (True, False):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        deepcluster.kmeans(x, args.k, iters=2)  # warm-up
        times = {}
        for iters in (1, 21):
            runs = []
            for r in range(args.repeats):
                sync(device)
                t = time.perf_counter()
                deepcluster.kmeans(x, args.k, iters=iters, seed=r)
                sync(device)
                runs.append(time.perf_counter() - t)
            times[iters] = statistics.median(runs)
        result[f"seconds_per_iteration_tf32_{'on' if tf32 else 'off'}"] = (times[21] - times[1]) / 20
        # correctness of one assignment step against float64, on a subset of points
        centroids = x[torch.randperm(args.n, device=device)[:args.k]]
        subset = x[:args.check_points]
        labels = deepcluster.assign(subset, centroids, 2 ** 27)
        d64 = torch.cdist(subset.double(), centroids.double()) ** 2
        best = d64.min(1).values
        chosen = d64.gather(1, labels[:, None])[:, 0]
        exact = (labels == d64.argmin(1)).float().mean().item()
        result[f"exact_match_tf32_{'on' if tf32 else 'off'}"] = exact
        result[f"wrong_by_1e-5_tf32_{'on' if tf32 else 'off'}"] = (chosen - best > 1e-5).float().mean().item()
    torch.cuda.reset_peak_memory_stats(device)
    deepcluster.kmeans(x, args.k, iters=1)
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return result


def cifar10_features(args):
    """CIFAR-10's training images through a random Sobel alexnet-small, PCA-whitened to --dim and
    L2-normalised: float32 (50000, dim). Read from --cache when that file exists, else saved there."""
    if args.cache and os.path.exists(args.cache):
        x = torch.load(args.cache)
        if x.shape[1] != args.dim:
            sys.exit(f"{args.cache} holds {x.shape[1]}-d features, not --dim {args.dim}")
        return x
    data = common.load_dataset("cifar10", "train", args.data_dir, "cpu")
    parser_args = deepcluster.parse_args(["--dataset", "cifar10"])
    torch.manual_seed(0)
    model = deepcluster.build_model(parser_args, 3, 32).eval()
    _, prepare = deepcluster.make_transforms(parser_args, data, torch.device("cpu"))
    features, _ = common.extract_features(model.features, data, prepare, parser_args.eval_batch_size)
    x = deepcluster.preprocess(features, args.dim)
    if args.cache:
        torch.save(x, args.cache)
    return x


def cpu_features(args):
    t = time.perf_counter()
    if args.source == "cifar10":
        x = cifar10_features(args)
    else:
        x = mixture(args.n, args.dim, args.k, torch.device("cpu"))
    result = {"source": args.source, "n": len(x), "dim": x.shape[1], "k": args.k, "iters": args.iters,
              "feature_seconds": time.perf_counter() - t, "threads": torch.get_num_threads()}
    return x, result


def faiss_benchmark(args):
    import faiss
    x, result = cpu_features(args)
    result.update(faiss=faiss.__version__, faiss_threads=faiss.omp_get_max_threads(), repeats=args.repeats)
    init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:args.k]]
    xn = x.numpy()

    def run_faiss():  # clustering.py's run_kmeans, from our initial centroids
        clus = faiss.Clustering(x.shape[1], args.k)
        clus.niter, clus.max_points_per_centroid = args.iters, len(x)
        faiss.copy_array_to_vector(init.numpy().ravel(), clus.centroids)
        index = faiss.IndexFlatL2(x.shape[1])
        clus.train(xn, index)
        return torch.from_numpy(index.search(xn, 1)[1][:, 0])

    runs = {"ours": lambda: deepcluster.kmeans(x, args.k, args.iters, init=init), "faiss": run_faiss}
    if args.before:
        spec = importlib.util.spec_from_file_location("deepcluster_before", args.before)
        before = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
        runs["before"] = lambda: before.kmeans(x, args.k, args.iters, init=init)
    seconds, labels = {name: [] for name in runs}, {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            labels[name] = fn()
            seconds[name].append(time.perf_counter() - t)
    for name, times in seconds.items():
        result[f"{name}_seconds_per_iteration"] = statistics.median(times) / args.iters
        result[f"{name}_runs_seconds"] = times
    result["time_ratio_ours_to_faiss"] = (result["ours_seconds_per_iteration"]
                                          / result["faiss_seconds_per_iteration"])
    result["same_cluster_as_faiss"] = (labels["ours"][0] == labels["faiss"]).double().mean().item()
    if args.before:
        result["time_ratio_ours_to_before"] = (result["ours_seconds_per_iteration"]
                                               / result["before_seconds_per_iteration"])
        result["time_ratio_before_to_faiss"] = (result["before_seconds_per_iteration"]
                                                / result["faiss_seconds_per_iteration"])
        result["same_labels_and_centroids_as_before"] = all(
            torch.equal(a, b) for a, b in zip(labels["ours"][:2], labels["before"][:2]))
    return result


def cpu_benchmark(args):
    from sklearn.cluster import KMeans
    x, result = cpu_features(args)
    xn = x.numpy().astype(np.float32)
    rows = []
    for seed in range(args.seeds):
        init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:args.k]]
        runs = {"ours_same_init": lambda: deepcluster.kmeans(x, args.k, args.iters, init=init),
                "sklearn_same_init": lambda: KMeans(args.k, init=init.numpy(), n_init=1, max_iter=args.iters,
                                                    tol=0, algorithm="lloyd").fit(xn),
                "ours_kmeans++": lambda: deepcluster.kmeans(x, args.k, args.iters, init="kmeans++",
                                                            seed=seed),
                "sklearn_kmeans++": lambda: KMeans(args.k, init="k-means++", n_init=1, max_iter=args.iters,
                                                   tol=0, algorithm="lloyd", random_state=seed).fit(xn)}
        row = {"seed": seed}
        for name, fn in runs.items():
            t = time.perf_counter()
            out = fn()
            row[f"{name}_seconds"] = time.perf_counter() - t
            row[f"{name}_inertia"] = float(out[2] if isinstance(out, tuple) else out.inertia_)
        print(json.dumps(row), flush=True)
        rows.append(row)
    for name in ("same_init", "kmeans++"):
        ours = statistics.mean(r[f"ours_{name}_inertia"] for r in rows)
        theirs = statistics.mean(r[f"sklearn_{name}_inertia"] for r in rows)
        result[f"{name}_inertia_ours"], result[f"{name}_inertia_sklearn"] = ours, theirs
        result[f"{name}_inertia_ratio"] = ours / theirs
        result[f"{name}_time_ratio"] = (statistics.mean(r[f"ours_{name}_seconds"] for r in rows)
                                        / statistics.mean(r[f"sklearn_{name}_seconds"] for r in rows))
    result["runs"] = rows
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, help="points (GPU default 1,281,167; CPU --source random default 50,000)")
    p.add_argument("--dim", type=int, default=256,
                   help="feature dimension (CPU --source cifar10: the PCA dimension; the Deep Dive's is 256)")
    p.add_argument("--k", type=int,
                   help="clusters (GPU default 10,000; CPU default 1,000: the Deep Dive's CIFAR-10 k)")
    p.add_argument("--iters", type=int, default=20, help="CPU comparison: k-means iterations")
    p.add_argument("--repeats", type=int, default=3, help="GPU, --against faiss: timed runs per measurement")
    p.add_argument("--check-points", type=int, default=20000, help="GPU: points checked against float64")
    p.add_argument("--source", choices=["cifar10", "random"], default="cifar10",
                   help="CPU: features to cluster")
    p.add_argument("--against", choices=["sklearn", "faiss"], default="sklearn",
                   help="CPU: compare with scikit-learn's KMeans (inertia and time) or faiss-cpu (time)")
    p.add_argument("--before", metavar="FILE",
                   help="CPU --against faiss: also time the k-means of this older deepcluster.py")
    p.add_argument("--seeds", type=int, default=3, help="CPU --against sklearn: repetitions")
    p.add_argument("--cache", help="CPU --source cifar10: read the features from this file if it exists, "
                   "else save them there (the network's pass takes minutes on a CPU)")
    p.add_argument("--data-dir", default=common.default_data_dir())
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    device = common.setup_device(args.device)
    gpu = device.type == "cuda"
    args.n = args.n or (1281167 if gpu else 50000)
    args.k = args.k or (10000 if gpu else 1000)
    result = (gpu_benchmark(args, device) if gpu else
              faiss_benchmark(args) if args.against == "faiss" else cpu_benchmark(args))
    result.update(torch=torch.__version__, command=" ".join(sys.argv))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
