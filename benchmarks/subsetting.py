"""Subsetting: connections per server, and churn when a server comes or goes (a simulation, no sockets).

``python -m benchmarks.subsetting [--quick]``. 1,000 clients over 300 servers with subsets of 20, for
lbkit's two algorithms (``lbkit.Subsetting``) and two baselines written here from the SRE book's chapter
on load balancing in the datacenter: *random subsetting* (each client shuffles the server list with its
own seed and takes the first 20) and *deterministic subsetting* (clients in rounds of
``servers // size``; each round shuffles the list with the round number as seed and gives each of its
clients the next ``size`` servers).

Measured: connections per server (max/mean, min/mean); for one server added or removed, how many
clients change their subset and by how many endpoints; and for one server down, how lbkit's widening
spreads the clients that lose it over the other servers.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks._common import Result, module_main
from lbkit.endpoint import Endpoint
from lbkit.subsetting import Subsetting, widened

__all__ = ["ALGORITHMS", "main", "plot", "run"]

CLIENTS, SERVERS, SIZE = 1000, 300, 20
QUICK_CLIENTS, QUICK_SERVERS, QUICK_SIZE = 200, 60, 10
DETERMINISTIC_GOAL = 1.10
"""max/mean connections per server for lbkit's deterministic algorithm."""
SRE_RANDOM_REPORTED = 1.21
"""The SRE book's max/mean for random subsetting: 300 clients, 300 backends, subsets of 90."""

Subsets = list[frozenset[str]]
Algorithm = Callable[[Sequence[str]], Subsets]
"""Server addresses -> every client's subset."""


def _endpoints(addresses: Sequence[str]) -> list[Endpoint]:
    return [Endpoint(a) for a in addresses]


def _lbkit(subsettings: Sequence[Subsetting]) -> Algorithm:
    def subsets(addresses: Sequence[str]) -> Subsets:
        eps = _endpoints(addresses)
        return [frozenset(e.address for e in s.select(eps)) for s in subsettings]

    return subsets


def lbkit_rendezvous(clients: int, size: int, fleet: int = 0) -> Algorithm:
    """lbkit's rendezvous hashing, client ids ``client-0`` ... (as host names would be)."""
    return _lbkit([Subsetting(size, client_id=_client_id(fleet, i)) for i in range(clients)])


def _client_id(fleet: int, i: int) -> str:
    return f"client-{i}" if fleet == 0 else f"fleet-{fleet}-client-{i}"


def lbkit_deterministic(clients: int, size: int, fleet: int = 0) -> Algorithm:
    """lbkit's deterministic ring, client ``i`` of ``clients``."""
    return _lbkit(
        [
            Subsetting(size, algorithm="deterministic", client_index=i, client_count=clients)
            for i in range(clients)
        ]
    )


def sre_random(clients: int, size: int, fleet: int = 0) -> Algorithm:
    """Random subsetting: each client shuffles the sorted server list with its own seed, takes ``size``."""

    def subsets(addresses: Sequence[str]) -> Subsets:
        out = []
        for i in range(clients):
            servers = sorted(addresses)
            random.Random(_client_id(fleet, i)).shuffle(servers)
            out.append(frozenset(servers[:size]))
        return out

    return subsets


def sre_deterministic(clients: int, size: int, fleet: int = 0) -> Algorithm:
    """The SRE book's deterministic subsetting: rounds of ``servers // size`` clients, one shuffle each."""

    def subsets(addresses: Sequence[str]) -> Subsets:
        subset_count = max(len(addresses) // size, 1)
        shuffled: dict[int, list[str]] = {}
        out = []
        for i in range(clients):
            round_ = i // subset_count
            if round_ not in shuffled:
                servers = sorted(addresses)
                random.Random(round_).shuffle(servers)
                shuffled[round_] = servers
            start = (i % subset_count) * size
            out.append(frozenset(shuffled[round_][start : start + size]))
        return out

    return subsets


ALGORITHMS: dict[str, Callable[[int, int, int], Algorithm]] = {
    "lbkit rendezvous": lbkit_rendezvous,
    "lbkit deterministic": lbkit_deterministic,
    "random (SRE book baseline)": sre_random,
    "deterministic (SRE book baseline)": sre_deterministic,
}
"""Name -> (clients, size, fleet) -> algorithm; ``fleet`` draws another set of client ids (or seeds)."""
RANDOM_LIKE = ("lbkit rendezvous", "random (SRE book baseline)")
"""The algorithms whose spread depends on the draw of client ids: shown over several fleets."""


def _addresses(n: int, first: int = 0) -> list[str]:
    return [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:50051" for i in range(first, first + n)]


def spread(subsets: Subsets, addresses: Sequence[str]) -> list[int]:
    """Connections per server, every server of ``addresses`` included (0 if no client holds it)."""
    counts = Counter(a for s in subsets for a in s)
    return [counts[a] for a in addresses]


def churn(before: Subsets, after: Subsets) -> list[int]:
    """Per client, how many endpoints entered its subset (each a connection opened, one closed)."""
    return [len(b - a) for a, b in zip(before, after, strict=True)]


def _churn_row(changes: list[list[int]], holding: list[int], fair: float) -> dict[str, float]:
    """``changes``: per trial, :func:`churn`; ``holding``: per trial, the clients whose subset holds the
    server that came or went (they must change); ``fair``: that server's fair share of connections."""
    clients = [sum(1 for c in trial if c) for trial in changes]
    per_client = [c for trial in changes for c in trial if c]
    mean_clients = statistics.mean(clients)
    return {
        "clients_changed": mean_clients,
        "clients_holding": statistics.mean(holding),
        "only_those_holding": float(all(c == h for c, h in zip(clients, holding, strict=True))),
        "fair_share": fair,
        "x_fair_share": mean_clients / fair,
        "endpoints_per_changed_client": statistics.mean(per_client) if per_client else 0.0,
        "endpoints_per_client_max": max(per_client, default=0),
    }


def failover(subsettings: Sequence[Subsetting], addresses: Sequence[str], down: str) -> dict[str, float]:
    """One server down: the clients that held it widen by one along their own order; where do they go?"""
    eps = _endpoints(addresses)
    gained: Counter[str] = Counter()
    widened_clients = 0
    for s in subsettings:
        order = s.order(eps)
        held = {e.address for e in order[: s.size]}
        if down not in held:
            continue
        widened_clients += 1
        now = {e.address for e in widened(order, s.size, {down}.__contains__)}
        gained.update(now - held)
    return {
        "clients_widened": widened_clients,
        "servers_gaining": len(gained),
        "most_gained_by_one_server": max(gained.values(), default=0),
    }


def run(quick: bool = False) -> Result:
    """Measure; return the result dict (see ``benchmarks._common``)."""
    clients, servers, size = (QUICK_CLIENTS, QUICK_SERVERS, QUICK_SIZE) if quick else (CLIENTS, SERVERS, SIZE)
    trials = 2 if quick else 10
    addresses = _addresses(servers)
    extra = _addresses(trials, first=servers + 1000)
    removed = [addresses[(t * 97) % servers] for t in range(trials)]
    mean = clients * size / servers

    balance_rows: list[list[object]] = []
    churn_rows: list[list[object]] = []
    data: dict[str, Any] = {"connections": {}, "churn": {}, "failover": {}, "quick": quick}
    for name, make in ALGORITHMS.items():
        algorithm = make(clients, size, 0)
        base = algorithm(addresses)
        counts = spread(base, addresses)
        hi, lo = max(counts) / mean, min(counts) / mean
        goal = DETERMINISTIC_GOAL if name == "lbkit deterministic" else None
        fleets = "-"
        if name in RANDOM_LIKE:
            his = [hi] + [
                max(spread(make(clients, size, f)(addresses), addresses)) / mean for f in (1, 2, 3, 4)
            ]
            fleets = f"{min(his):.2f} - {max(his):.2f}"
        balance_rows.append(
            [
                name,
                f"{hi:.3f}",
                f"{lo:.3f}",
                f"{statistics.pstdev(counts) / mean:.3f}",
                fleets,
                f"<= {goal:.2f}" if goal else "-",
                ("pass" if hi <= goal else "FAIL") if goal else "-",
            ]
        )
        data["connections"][name] = sorted(counts, reverse=True)
        rows: dict[str, dict[str, float]] = {}
        adds, took = [], []
        for new in extra:
            after = algorithm([*addresses, new])
            adds.append(churn(base, after))
            took.append(sum(1 for s in after if new in s))
        rows["add"] = _churn_row(adds, took, clients * size / (servers + 1))
        removes, held = [], []
        for gone in removed:
            removes.append(churn(base, algorithm([a for a in addresses if a != gone])))
            held.append(sum(1 for s in base if gone in s))
        rows["remove"] = _churn_row(removes, held, mean)
        for change, row in rows.items():
            churn_rows.append(
                [
                    name,
                    f"one server {'added' if change == 'add' else 'removed'}",
                    f"{row['clients_changed']:.1f}",
                    f"{row['clients_holding']:.1f}",
                    f"{row['x_fair_share']:.2f}x",
                    f"{row['endpoints_per_changed_client']:.2f}",
                    row["endpoints_per_client_max"],
                ]
            )
        data["churn"][name] = rows
        data["balance"] = data.get("balance", {}) | {name: {"max_over_mean": hi, "min_over_mean": lo}}

    failover_rows: list[list[object]] = []
    for name, subsettings in (
        ("lbkit rendezvous", [Subsetting(size, client_id=f"client-{i}") for i in range(clients)]),
        (
            "lbkit deterministic",
            [
                Subsetting(size, algorithm="deterministic", client_index=i, client_count=clients)
                for i in range(clients)
            ],
        ),
    ):
        outcomes = [failover(subsettings, addresses, down) for down in removed[: 2 if quick else 5]]
        merged = {k: statistics.mean(o[k] for o in outcomes) for k in outcomes[0]}
        most = max(o["most_gained_by_one_server"] for o in outcomes)
        data["failover"][name] = merged | {"most_gained_worst": most}
        failover_rows.append(
            [
                name,
                f"{merged['clients_widened']:.1f}",
                f"{merged['servers_gaining']:.1f}",
                f"{merged['most_gained_by_one_server']:.1f}",
                most,
            ]
        )

    # The random baseline at the SRE book's own scale, to check it against the book's figure.
    book_servers = _addresses(300)
    book = [max(spread(sre_random(300, 90, f)(book_servers), book_servers)) / 90 for f in range(5)]
    data["sre_book_scale_random_max_over_mean"] = book

    balance = data["balance"]
    rdv_churn, det_churn = data["churn"]["lbkit rendezvous"], data["churn"]["lbkit deterministic"]
    sre = data["churn"]["deterministic (SRE book baseline)"]
    det_worst = max(det_churn[c]["endpoints_per_client_max"] for c in ("add", "remove"))
    rdv_exact = all(
        rdv_churn[c]["only_those_holding"] and rdv_churn[c]["endpoints_per_client_max"] <= 1
        for c in ("add", "remove")
    )
    data["rendezvous_churn_goal_met"] = rdv_exact
    notes = [
        f"{clients:,} clients, {servers} servers, subsets of {size}: {mean:.2f} connections per server on "
        f"average. Churn: the mean over {trials} additions of a new server and {trials} removals of "
        "servers spread over the list; an endpoint changed is one connection opened and one closed.",
        "Clients holding the server: for a removal, the clients whose subset held it (they must change); "
        "for an addition, those whose new subset takes it. x fair share: clients changed over the "
        f"server's fair share of connections ({mean:.1f}; {clients * size / (servers + 1):.1f} after an "
        "addition), the fewest clients that can change while the spread stays even.",
        "Rendezvous: only the clients holding the server that came or went change, by one endpoint each "
        f"(goal {'met' if rdv_exact else 'NOT met'} in every trial of this run); which clients take a new "
        f"server is a random draw, {rdv_churn['add']['clients_holding']:.1f} on average against a fair "
        f"share of {rdv_churn['add']['fair_share']:.1f}. Its connections spread as random draws do: "
        f"max/mean {balance['lbkit rendezvous']['max_over_mean']:.2f}, like the random baseline.",
        f"Deterministic ring: max/mean {balance['lbkit deterministic']['max_over_mean']:.3f} (goal <= "
        f"{DETERMINISTIC_GOAL:.2f}; counts differ by at most one). A change of the server set shifts many "
        f"clients' windows by one position: {det_churn['add']['clients_changed']:.0f} clients change on "
        f"an addition and {det_churn['remove']['clients_changed']:.0f} on a removal "
        f"({det_churn['add']['x_fair_share']:.1f}x and {det_churn['remove']['x_fair_share']:.1f}x the fair "
        "share), "
        f"each by {det_churn['add']['endpoints_per_changed_client']:.2f} endpoints on average, at most "
        f"{det_worst} in this run (two can change where a window wraps round the ring's end). The SRE "
        "book's deterministic subsetting reshuffles whole rounds instead: "
        f"{min(sre[c]['clients_changed'] for c in ('add', 'remove')):.0f} to "
        f"{max(sre[c]['clients_changed'] for c in ('add', 'remove')):.0f} clients change, by "
        f"{min(sre[c]['endpoints_per_changed_client'] for c in ('add', 'remove')):.1f} to "
        f"{max(sre[c]['endpoints_per_changed_client'] for c in ('add', 'remove')):.1f} endpoints each "
        "on average.",
        "max/mean, 5 fleets: the same over five draws of client ids (seeds, for the random baseline); "
        "the algorithms with no draw give one figure.",
        f"The random baseline at the SRE book's own scale (300 clients, 300 backends, subsets of 90): "
        f"max/mean {min(book):.2f} - {max(book):.2f} over five fleets, mean {statistics.mean(book):.2f} "
        f"(the book reports {SRE_RANDOM_REPORTED} for its one run).",
        "One server down: the clients that held it widen by one endpoint, each along its own preference "
        "order; rendezvous spreads them over random servers, the ring over the servers that follow the "
        "down one.",
        "Default: rendezvous. It needs no coordination (a stable client id, the host name by default), "
        "and a server added or removed moves only the connections that must move. Use "
        "algorithm='deterministic' when every client can be given its index and the client count and "
        "even connection counts matter more than churn.",
    ]
    return {
        "title": "Subsetting",
        "tables": [
            {
                "caption": f"connections per server: {clients:,} clients, {servers} servers, "
                f"subsets of {size}",
                "columns": [
                    "algorithm",
                    "max/mean",
                    "min/mean",
                    "stdev/mean",
                    "max/mean, 5 fleets",
                    "goal",
                    "result",
                ],
                "rows": balance_rows,
            },
            {
                "caption": f"churn when one server is added or removed (mean of {trials} each)",
                "columns": [
                    "algorithm",
                    "change",
                    "clients changed",
                    "clients holding the server",
                    "x fair share",
                    "endpoints per changed client",
                    "max endpoints, one client",
                ],
                "rows": churn_rows,
            },
            {
                "caption": "one server down: lbkit's widening",
                "columns": [
                    "algorithm",
                    "clients widened",
                    "servers gaining a connection",
                    "most gained by one server",
                    "worst of the runs",
                ],
                "rows": failover_rows,
            },
        ],
        "notes": notes,
        "data": data,
    }


def plot(data: dict[str, Any], plt: Any) -> Any:
    """A figure: sorted connections per server for each algorithm, and clients changed per set change."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ["-", "--", "-", ":"]
    for (name, counts), style in zip(data["connections"].items(), styles, strict=False):
        left.plot(range(len(counts)), counts, style, label=name, linewidth=1.6)
    some = next(iter(data["connections"].values()))
    left.axhline(statistics.mean(some), color="grey", linestyle=":", linewidth=1, label="mean")
    left.set_xlabel("servers, most connections first")
    left.set_ylabel("connections")
    left.set_title("Connections per server")
    left.legend(fontsize=7)
    names = list(data["churn"])
    width = 0.38
    for offset, change, label in ((-width / 2, "add", "one server added"), (width / 2, "remove", "removed")):
        values = [data["churn"][n][change]["clients_changed"] for n in names]
        right.bar([i + offset for i in range(len(names))], values, width, label=label)
    fair = statistics.mean(data["churn"][names[0]][c]["fair_share"] for c in ("add", "remove"))
    right.axhline(fair, color="k", linestyle=":", linewidth=1, label="fair share of one server")
    right.set_xticks(range(len(names)))
    right.set_xticklabels([n.replace(" (SRE book baseline)", "\n(SRE book)") for n in names], fontsize=7)
    right.set_ylabel("clients that change their subset")
    right.set_title("Churn when the server set changes")
    right.legend(fontsize=7)
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.subsetting [--quick] [--json PATH]``."""
    module_main("subsetting", run, argv)


if __name__ == "__main__":
    main()
