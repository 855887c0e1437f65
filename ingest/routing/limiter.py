"""Per-token rate limiting for the overflow lane: GCRA token buckets.

What it must not do: allocate per record beyond one dict entry per token, drift (times
are integer nanoseconds), or grow without bound (idle tokens are forgotten by swapping
two generations of dicts).  Pure: no I/O, no eventlet.
"""

DEFAULT_RATE = 1000.0
DEFAULT_BURST_SECONDS = 2.0      # burst defaults to two seconds' worth of the rate
DEFAULT_MAX_TRACKED = 100_000    # bucket entries per generation (so at most 2x this)
MIN_GENERATION_S = 10.0          # idle-token sweep period floor (seconds)
MAX_RATE = 1e6                   # per token and second; buckets count in nanoseconds


class TokenBuckets:
    """One token bucket per token, as GCRA: each token stores a single number, its
    "theoretical arrival time" (TAT).  A record at `now` is admitted when
    max(TAT, now) + interval - now <= burst * interval, and then TAT moves on by one
    interval; overflowed records leave TAT alone.  This is exactly a bucket of `burst`
    records refilled at `rate` per second, but needs no second field and no per-record
    object other than the number itself.

    Times are integer nanoseconds (`now` rounded to the microsecond).  In float seconds,
    `tat += interval` at epoch magnitudes (ulp 0.24 us) drifts: with rate 5000 and burst
    1 not even one record of a request was admitted.  Integers are exact whatever the
    clock, so a burst of exactly `burst` records at one instant always fits.

    Forgetting idle tokens, O(1) amortised: state lives in two generations, `young` and
    `old`.  Writes go to `young`; a token found only in `old` is carried into `young`
    on its first record of the generation.  Every generation (>= burst/rate), or when
    `young` reaches `max_tracked` entries, `old` is dropped and `young` becomes `old`.
    A token dropped that way was not written for at least one full generation, so its
    TAT is already in the past: its bucket is full, which is the same as having no
    entry, so forgetting on the time rule changes no decision.  The size rule (a flood
    of distinct tokens) may forget a bucket early; then that token gets a fresh burst.
    Dropping a dict frees its entries, each created by one record: O(1) per record.
    """

    __slots__ = ("rate", "burst", "max_tracked", "interval", "limit", "clock_back",
                 "generation_ns", "young", "old", "swap_at")

    def __init__(self, rate, burst, max_tracked):
        self.rate = rate
        self.burst = burst
        self.max_tracked = max_tracked
        self.interval = max(1, round(1e9 / rate))          # ns between records
        self.limit = burst * self.interval
        # Beyond this, a stored TAT cannot come from a clock that only moves forward.
        self.clock_back = self.limit + self.interval
        self.generation_ns = max(self.limit, int(MIN_GENERATION_S * 1e9))
        self.young = {}
        self.old = {}
        self.swap_at = -1 << 80          # the first record starts the first generation

    @property
    def generation_s(self):
        return self.generation_ns / 1e9

    def settings(self):
        return (self.rate, self.burst, self.max_tracked)

    def __len__(self):
        return len(self.young) + len(self.old)

    def _swap(self, now):
        self.old = self.young
        self.young = {}
        self.swap_at = now + self.generation_ns

    def admit(self, token, now):
        """True if the record (at float seconds `now`) fits the token's bucket."""
        # Round to the microsecond first: epoch floats are only good to 0.24 us, so this
        # lands 1795662710.123 s on its exact ns value; the same float always gives the
        # same integer, so the mapping is monotonic.
        now = int(now * 1e6 + 0.5) * 1000
        if now >= self.swap_at:
            self._swap(now)
        young = self.young
        stored = young.get(token)
        if stored is None:
            return self._first_in_generation(token, now)
        tat = (stored if stored > now else now) + self.interval
        if tat - now <= self.limit:
            young[token] = tat
            return True
        if tat - now <= self.clock_back:
            return False          # over the limit: the record overflows, TAT stays
        return self._restart(token, now)

    def _first_in_generation(self, token, now):
        """A token's first record in this generation: carry its state over from `old`
        (or start it), so a token that keeps sending is never dropped, even when a
        flood of new tokens forces early swaps."""
        stored = self.old.get(token, now)
        young = self.young
        if len(young) >= self.max_tracked:
            self._swap(now)
            young = self.young
        tat = (stored if stored > now else now) + self.interval
        if tat - now <= self.limit:
            young[token] = tat
            return True
        if tat - now <= self.clock_back:
            young[token] = stored
            return False
        return self._restart(token, now)

    def _restart(self, token, now):
        """The stored TAT is further ahead than any forward-moving clock allows: `now`
        went backwards.  Start the token afresh and re-arm the sweep from here."""
        self.young[token] = now + self.interval
        self.swap_at = now + self.generation_ns
        return True
