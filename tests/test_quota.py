"""The quota estimate (sans-I/O): an account's balance minus this node's increments the database
has not acknowledged — each subtracted exactly until a balance read that includes it arrives."""

from meshrt.supervisor.quota import QuotaEstimate


def test_no_decision_before_any_balance_is_known():
    estimate = QuotaEstimate()
    estimate.add(("s", 1), 500)
    assert estimate.available is None and not estimate.exhausted


def test_unacknowledged_increments_are_subtracted():
    estimate = QuotaEstimate()
    estimate.observe_balance(1000, as_of=3)
    estimate.add(("s", 1), 400)
    estimate.add(("s", 2), 600)
    assert estimate.available == 0 and not estimate.exhausted  # at zero: refused in-band, not stopped
    estimate.add(("s", 3), 1)
    assert estimate.available == -1 and estimate.exhausted


def test_an_increment_counts_once_whichever_reply_comes_first():
    # job 5 applied it (balance 600 after); a refresh by job 7 saw 600 too
    in_order, out_of_order = QuotaEstimate(), QuotaEstimate()
    for estimate in (in_order, out_of_order):
        estimate.observe_balance(1000, as_of=2)
        estimate.add(("s", 1), 400)
    in_order.observe_balance(600, 5)
    in_order.acknowledged(("s", 1), 5)
    in_order.observe_balance(600, 7)
    out_of_order.observe_balance(600, 7)  # the refresh's reply is handled before the debit's
    assert out_of_order.available == 600 - 400  # not yet known to be inside that balance
    out_of_order.acknowledged(("s", 1), 5)
    out_of_order.observe_balance(600, 5)  # an older read never replaces a newer one
    assert in_order.available == out_of_order.available == 600


def test_a_replayed_increment_the_database_had_is_not_counted_again():
    # after a supervisor restart the spool is replayed: the database already had seq 1
    estimate = QuotaEstimate()
    estimate.observe_balance(10_000, as_of=1)  # read fresh; includes seq 1's debit
    estimate.add(("s", 1), 4_000)
    estimate.acknowledged(("s", 1), 3)  # the apply (job 3) found it applied: it is in balance as of <= 3
    estimate.observe_balance(10_000, as_of=4)
    assert estimate.available == 10_000


def test_a_top_up_seen_by_a_refresh_lifts_the_stop():
    estimate = QuotaEstimate()
    estimate.observe_balance(100, as_of=1)
    estimate.add(("s", 1), 150)
    assert estimate.exhausted
    estimate.observe_balance(10_000_000 - 150, as_of=9)  # topped up; the debit landed at job 4
    estimate.acknowledged(("s", 1), 4)
    assert estimate.available == 10_000_000 - 150 and not estimate.exhausted


def test_an_estimate_is_settled_once_every_increment_is_acknowledged():
    estimate = QuotaEstimate()
    estimate.observe_balance(1000, as_of=1)
    estimate.add(("s", 1), 100)
    assert not estimate.settled
    estimate.acknowledged(("s", 1), 5)  # acknowledged, not yet inside a balance read
    assert estimate.settled and estimate.pending == 100
