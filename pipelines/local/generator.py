"""A realistic event generator for the transactions and labels topics, with injected faults.

Deterministic for a given seed and ``end`` time: the same :class:`GeneratorSpec` yields the same
records in the same order. Besides clean events it injects, each at its own rate:

* late events: event time well behind the stream (still inside ``max_event_age``: valid);
* out-of-order events: event time a little behind the previous ones (valid);
* duplicate deliveries: the exact bytes of an earlier valid record sent again a little later;
* bad records of every class in :data:`pipelines.contracts.validation.ERROR_CLASSES`, spread
  evenly; for topics produced as Avro (``avro_topics``), the Avro classes of
  :data:`pipelines.contracts.avro.AVRO_ERROR_CLASSES` and the record-level classes a serializer
  lets through (:data:`AVRO_FIELD_FAULTS`).

Avro records leave :func:`generate` as events (``value`` None); :class:`AvroEncoder` turns them
into the Confluent wire format at :func:`produce` time, with confluent-kafka's serializer and the
schema registered for the contract (it never registers one itself), and builds the Avro bad
classes from a correctly framed record.

Labels (fraud outcomes) follow a sample of the valid transactions, ``label_delay`` later, and
are sent when the stream's clock passes their label time; labels not yet due at ``end`` are
not sent (the outcome is not known yet). Fraud is not uniform, so that a model has something to
learn: a transaction above 150 USD (about 9 % of them) is 8x as likely to be fraud as the
average, one below 0.3x, so that the rate averages about ``fraud_rate``. Every record sent is counted by kind in a
:class:`GeneratorSummary`, so an ingest run can be reconciled against it exactly.

With ``account_change_rate`` the generator is also the account service: the ``accounts`` table
(:mod:`pipelines.local.appdb`) gets a row for an account just before its first transaction, and
after a transaction, at that rate, a change of the account: an update of its status, credit limit
or home country, or (one change in 20) its deletion (a later transaction of the account opens it
again). These records (topic :data:`ACCOUNTS`) are written to the database by :func:`produce`,
each in a transaction of its own, in their place in the stream: account changes and transactions
interleave in time. With the rate at 0 nothing of this is drawn, and the records are those of
earlier versions for the same seed.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from confluent_kafka import Producer
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from pipelines.contracts.avro import (
    AVRO_ERROR_CLASSES,
    CORRUPT_PAYLOAD,
    SUBJECT_MISMATCH,
    TRUNCATED_HEADER,
    UNKNOWN_SCHEMA_ID,
    WRONG_MAGIC_BYTE,
    encode_wire,
)
from pipelines.contracts.registry import SchemaRegistry, schema_text
from pipelines.contracts.validation import ERROR_CLASSES
from pipelines.core.contract_spec import Contract
from pipelines.core.settings import SchemaRegistrySettings, TopicSettings

#: Every class the generator can inject.
ALL_ERROR_CLASSES = ERROR_CLASSES + AVRO_ERROR_CLASSES
#: The record-level classes an Avro record can be made to have: a serializer that checks types
#: writes no null into a required field and no string into a number.
AVRO_FIELD_FAULTS = ("negative_value", "future_event_time", "stale_event_time")

log = logging.getLogger(__name__)

TRANSACTIONS = "transactions"
LABELS = "labels"
#: The records that are changes of the accounts table, not Kafka messages.
ACCOUNTS = "accounts"
_STATUSES = ("active", "active", "active", "frozen", "review")
_COUNTRIES = ("US", "GB", "DE", "FR", "ES", "IT", "PL", "NL", "BR", "IN")
#: Kinds of record that must land in bronze (once each); duplicates must not.
VALID_KINDS = ("valid", "late", "out_of_order")
DUPLICATE = "duplicate"
_MCC = ("5411", "5812", "5541", "5999", "4111", "5732", "7011", "5912", "4829", "6011")
_RENAMES = {TRANSACTIONS: ("balance_usd", "account_balance"), LABELS: ("is_fraud", "fraud")}


def fraud_risk(amount: float) -> float:
    """How much likelier than average a transaction is to be fraud (mean about 1 over the
    generated amounts)."""
    return 8.0 if amount > 150 else 0.3


@dataclass(frozen=True)
class GeneratorSpec:
    """What to generate. Rates are per transaction; ``bad_rate`` is split evenly over ``bad_classes``."""

    count: int = 10_000
    accounts: int = 1_000
    merchants: int = 200
    seed: int = 7
    #: Event time of the last transaction (default: now, to the millisecond).
    end: datetime | None = None
    #: Event time covered by the transactions, ending at ``end``.
    span: timedelta = timedelta(days=2)
    #: Records per second to send (0: as fast as the producer goes).
    rate: float = 0.0
    late_rate: float = 0.02
    late_by: tuple[timedelta, timedelta] = (timedelta(minutes=30), timedelta(hours=6))
    out_of_order_rate: float = 0.05
    out_of_order_by: timedelta = timedelta(minutes=2)
    duplicate_rate: float = 0.01
    bad_rate: float = 0.02
    bad_classes: tuple[str, ...] = ALL_ERROR_CLASSES
    #: Logical topics (transactions, labels) produced as Avro; the others as JSON.
    avro_topics: frozenset[str] = frozenset()
    label_rate: float = 0.2
    #: Per transaction: a change of its account in the accounts table follows (0: no table writes).
    account_change_rate: float = 0.0
    fraud_rate: float = 0.03
    label_delay: tuple[timedelta, timedelta] = (timedelta(hours=1), timedelta(days=2))
    #: Must match the ingest settings for the time and size classes to be what they say.
    max_event_age: timedelta = timedelta(days=7)
    future_tolerance: timedelta = timedelta(minutes=5)
    max_value_bytes: int = 65_536

    def __post_init__(self) -> None:
        unknown = set(self.bad_classes) - set(ALL_ERROR_CLASSES)
        if unknown:
            raise ValueError(f"bad_classes: unknown error classes {sorted(unknown)}")
        for name in ("late_rate", "out_of_order_rate", "duplicate_rate", "bad_rate", "label_rate", "fraud_rate",
                     "account_change_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: {getattr(self, name)} is not a fraction in [0, 1]")
        if self.count < 0 or self.accounts <= 0 or self.merchants <= 0:
            raise ValueError("count must be >= 0, accounts and merchants > 0")
        if self.late_by[1] + self.span >= self.max_event_age:
            raise ValueError("span + late_by must stay inside max_event_age, or late events turn stale")


@dataclass(frozen=True)
class Record:
    #: A logical topic, or :data:`ACCOUNTS` for a change of the accounts table (kind ``insert``,
    #: ``update`` or ``delete``; ``event`` the row, or its key for a delete).
    topic: str
    key: bytes
    #: The bytes to send; None for an Avro record, encoded by :class:`AvroEncoder` from ``event``.
    value: bytes | None
    #: valid, late, out_of_order, duplicate, or an error class.
    kind: str
    #: The event id of valid kinds and duplicates (None for bad records).
    event_id: str | None = None
    #: The event as sent (Avro records; for a bad record, the event it was made from).
    event: Mapping | None = None


@dataclass
class GeneratorSummary:
    """Counts of records sent, by (physical) topic and kind."""

    counts: defaultdict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def add(self, topic: str, kind: str) -> None:
        self.counts[topic][kind] += 1

    def sent(self, topic: str) -> int:
        return sum(self.counts[topic].values())

    def extend(self, other: GeneratorSummary) -> GeneratorSummary:
        """Adds ``other``'s counts (records of the same stream sent in another part); returns self."""
        for topic, counter in other.counts.items():
            self.counts[topic].update(counter)
        return self

    def expected_bronze(self, topic: str) -> int:
        return sum(self.counts[topic][k] for k in VALID_KINDS)

    def expected_dead_letters(self, topic: str) -> dict[str, int]:
        return {k: n for k, n in self.counts[topic].items() if k in ALL_ERROR_CLASSES and n}

    def duplicates(self, topic: str) -> int:
        return self.counts[topic][DUPLICATE]

    def to_dict(self) -> dict:
        return {
            topic: {
                "sent": self.sent(topic),
                "expected_bronze": self.expected_bronze(topic),
                "duplicates": self.duplicates(topic),
                "expected_dead_letters": self.expected_dead_letters(topic),
                "by_kind": dict(sorted(counter.items())),
            }
            for topic, counter in self.counts.items()
        }

    def table(self) -> str:
        kinds = sorted({k for c in self.counts.values() for k in c})
        lines = [f"{'kind':<20}" + "".join(f"{t:>14}" for t in self.counts)]
        for kind in kinds:
            lines.append(f"{kind:<20}" + "".join(f"{self.counts[t][kind]:>14}" for t in self.counts))
        lines.append(f"{'sent':<20}" + "".join(f"{self.sent(t):>14}" for t in self.counts))
        return "\n".join(lines)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class _Corruptor:
    """Turns a valid event into a bad record of a given class."""

    def __init__(self, spec: GeneratorSpec, end: datetime, rng: random.Random):
        self.spec, self.end, self.rng = spec, end, rng

    def supports(self, topic: str, error_class: str) -> bool:
        if error_class == "negative_value" and topic != TRANSACTIONS:
            return False
        if topic in self.spec.avro_topics:
            return error_class in AVRO_ERROR_CLASSES or error_class in AVRO_FIELD_FAULTS
        return error_class in ERROR_CLASSES

    def bad_record(self, topic: str, key: bytes, event: dict, error_class: str) -> Record:
        """A bad record of ``error_class`` made from a valid ``event``."""
        if topic not in self.spec.avro_topics:
            return Record(topic, key, self.corrupt(topic, event, error_class), error_class)
        if error_class in AVRO_FIELD_FAULTS:
            event = self.corrupt_event(topic, event, error_class)
        # Avro classes: the encoder frames the valid event, then breaks the frame.
        return Record(topic, key, None, error_class, event=event)

    def corrupt_event(self, topic: str, event: dict, error_class: str) -> dict:
        """The event with the field-level fault of ``error_class`` (record-level classes)."""
        event = dict(event)
        time_field = "event_time" if topic == TRANSACTIONS else "label_time"
        if error_class == "negative_value":
            event["amount_usd"] = -round(event["amount_usd"] + 0.01, 2)
        elif error_class == "future_event_time":
            event[time_field] = _iso(self.end + self.spec.max_event_age + timedelta(days=30))
        elif error_class == "stale_event_time":
            event[time_field] = _iso(self.end - self.spec.max_event_age - timedelta(days=1))
        else:
            raise ValueError(f"{error_class} is not a field-level fault")
        return event

    def corrupt(self, topic: str, event: dict, error_class: str) -> bytes:
        event = dict(event)
        if error_class == "oversize":
            padding = " " * (self.spec.max_value_bytes + 64)
            return _dumps(event)[:-1] + padding.encode() + b"}"
        if error_class == "not_utf8":
            raw = bytearray(_dumps(event))
            raw[len(raw) // 2] = 0xFF
            return bytes(raw)
        if error_class == "not_json":
            raw = _dumps(event)
            # Half truncated, half two objects glued together (a lenient parser keeps the first).
            return raw[: len(raw) // 2] if self.rng.random() < 0.5 else raw + raw
        if error_class == "renamed_field":
            old, new = _RENAMES[topic]
            event[new] = event.pop(old)
        elif error_class == "missing_field":
            event.pop("account_id")
        elif error_class == "unknown_field":
            event["promo_code"] = "WELCOME10"
        elif error_class == "null_field":
            event["account_id"] = None
        elif error_class == "wrong_type":
            if topic == TRANSACTIONS:
                event["amount_usd"] = f"{event['amount_usd']:.2f}"  # a quoted number is a string
            else:
                event["is_fraud"] = "false"
        elif error_class in ("negative_value", "future_event_time", "stale_event_time"):
            event = self.corrupt_event(topic, event, error_class)
        return _dumps(event)


def generate(spec: GeneratorSpec) -> Iterator[Record]:
    """The records to send, in order (deterministic for ``spec``)."""
    rng = random.Random(spec.seed)
    end = (spec.end or datetime.now(timezone.utc)).astimezone(timezone.utc)
    start = end - spec.span
    corruptor = _Corruptor(spec, end, rng)
    accounts = [f"acct-{i:06d}" for i in range(spec.accounts)]
    balances = {a: round(rng.uniform(200, 20_000), 2) for a in accounts}
    devices = {a: uuid.UUID(int=rng.getrandbits(128)).hex[:16] for a in accounts}
    bad_cycle = {TRANSACTIONS: 0, LABELS: 0}
    pending_duplicates: list[tuple[int, int, Record]] = []  # (due index, tiebreak, record)
    pending_labels: list[tuple[datetime, int, str, dict]] = []  # (label time, tiebreak, key, event)
    sequence = 0
    #: The accounts table as the generator has written it (account -> row).
    rows: dict[str, dict] = {}

    def account_row(account: str) -> dict:
        return {"account_id": account, "status": "active",
                "credit_limit": float(rng.choice((500, 1000, 2500, 5000, 10000))),
                "home_country": rng.choice(_COUNTRIES)}

    def account_change(account: str) -> Record:
        if rng.random() < 0.05:
            del rows[account]
            return Record(ACCOUNTS, account.encode(), None, "delete", event={"account_id": account})
        row = dict(rows[account])
        what = rng.random()
        if what < 0.5:
            row["status"] = rng.choice([s for s in _STATUSES if s != row["status"]])
        elif what < 0.9:
            row["credit_limit"] = float(rng.choice((500, 1000, 2500, 5000, 10000, 20000)))
        else:
            row["home_country"] = rng.choice([c for c in _COUNTRIES if c != row["home_country"]])
        rows[account] = row
        return Record(ACCOUNTS, account.encode(), None, "update", event=row)

    def valid_record(topic: str, key: bytes, event: dict, kind: str, event_id: str) -> Record:
        if topic in spec.avro_topics:
            return Record(topic, key, None, kind, event_id, event)
        return Record(topic, key, _dumps(event), kind, event_id)

    def bad_class_for(topic: str) -> str | None:
        classes = [c for c in spec.bad_classes if corruptor.supports(topic, c)]
        if not classes:
            return None
        chosen = classes[bad_cycle[topic] % len(classes)]
        bad_cycle[topic] += 1
        return chosen

    def due_labels(now: datetime) -> Iterator[Record]:
        while pending_labels and pending_labels[0][0] <= now:
            _, _, key, label = heapq.heappop(pending_labels)
            if spec.bad_rate and rng.random() < spec.bad_rate and (error_class := bad_class_for(LABELS)):
                yield corruptor.bad_record(LABELS, key.encode(), label, error_class)
            else:
                yield valid_record(LABELS, key.encode(), label, "valid", label["transaction_id"])

    for i in range(spec.count):
        stream_time = start + spec.span * (i / max(spec.count - 1, 1))
        yield from due_labels(stream_time)
        while pending_duplicates and pending_duplicates[0][0] <= i:
            yield heapq.heappop(pending_duplicates)[2]

        account = rng.choice(accounts)
        if spec.account_change_rate and account not in rows:
            rows[account] = account_row(account)
            yield Record(ACCOUNTS, account.encode(), None, "insert", event=rows[account])
        amount = round(min(rng.lognormvariate(3.5, 1.1), 25_000.0), 2)
        balances[account] = round(max(balances[account] - amount, 0.0) + rng.choice((0.0, 0.0, 500.0)), 2)
        kind, event_time = "valid", stream_time
        roll = rng.random()
        if roll < spec.late_rate:
            kind = "late"
            event_time = stream_time - timedelta(
                seconds=rng.uniform(spec.late_by[0].total_seconds(), spec.late_by[1].total_seconds())
            )
        elif roll < spec.late_rate + spec.out_of_order_rate:
            kind = "out_of_order"
            event_time = stream_time - timedelta(seconds=rng.uniform(1, spec.out_of_order_by.total_seconds()))
        event = {
            "transaction_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "account_id": account,
            "merchant_id": f"merch-{rng.randrange(spec.merchants):05d}",
            "amount_usd": amount,
            "merchant_category_code": rng.choice(_MCC),
            "balance_usd": balances[account],
            "event_time": _iso(event_time),
        }
        if rng.random() < 0.85:
            event["device_fingerprint"] = devices[account]
        key = account.encode()

        if spec.bad_rate and rng.random() < spec.bad_rate and (error_class := bad_class_for(TRANSACTIONS)):
            yield corruptor.bad_record(TRANSACTIONS, key, event, error_class)
            continue
        record = valid_record(TRANSACTIONS, key, event, kind, event["transaction_id"])
        yield record
        if spec.account_change_rate and rng.random() < spec.account_change_rate:
            yield account_change(account)
        if rng.random() < spec.duplicate_rate:
            sequence += 1
            # The same bytes again (an Avro event encodes to the same bytes).
            duplicate = dataclasses.replace(record, kind=DUPLICATE)
            heapq.heappush(pending_duplicates, (i + rng.randint(1, 500), sequence, duplicate))
        if rng.random() < spec.label_rate:
            delay = rng.uniform(spec.label_delay[0].total_seconds(), spec.label_delay[1].total_seconds())
            label_time = event_time + timedelta(seconds=delay)
            if label_time <= end:
                sequence += 1
                label = {
                    "transaction_id": event["transaction_id"],
                    "account_id": account,
                    "is_fraud": rng.random() < spec.fraud_rate * fraud_risk(amount),
                    "label_time": _iso(label_time),
                }
                heapq.heappush(pending_labels, (label_time, sequence, account, label))

    yield from due_labels(end)
    while pending_duplicates:
        yield heapq.heappop(pending_duplicates)[2]


#: A schema id no registry hands out soon (ids count up from 1): the unknown-id fault.
UNKNOWN_ID = 2**31 - 7


class AvroEncoder:
    """Encodes the Avro records of :func:`generate` in the Confluent wire format with
    confluent-kafka's ``AvroSerializer``, using the schema registered for each topic's contract
    (``auto.register.schemas`` off: a producer cannot ship a schema that did not pass the gate),
    and breaks the frame of the Avro fault classes.

    ``contracts``: logical topic -> contract; ``topic_names``: logical -> physical topic.
    """

    def __init__(self, registry_settings: SchemaRegistrySettings, contracts: Mapping[str, Contract],
                 topic_names: Mapping[str, str]):
        self.registry = SchemaRegistry(registry_settings)
        self.contracts = dict(contracts)
        self.topic_names = dict(topic_names)
        self.serializers = {
            logical: AvroSerializer(self.registry.client, schema_text(contract),
                                    conf={"auto.register.schemas": False, "normalize.schemas": False})
            for logical, contract in self.contracts.items()
        }
        self._foreign_ids: dict[str, int] = {}

    def _values(self, contract: Contract, event: Mapping) -> dict:
        """The event as the contract's Avro record: its fields only, timestamps as datetimes."""
        values = {}
        for spec in contract.fields:
            value = event.get(spec.name)
            if spec.type == "timestamp" and isinstance(value, str):
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            values[spec.name] = value
        return values

    def foreign_id(self, logical: str) -> int:
        """The id of a schema registered under a subject other than ``logical``'s (the
        subject-mismatch fault): another Avro topic's, else any other subject's."""
        if logical not in self._foreign_ids:
            mine = TopicSettings.subject(self.topic_names.get(logical, logical))
            own_ids = {v.schema_id for v in self.registry.versions(mine)}
            others = [TopicSettings.subject(self.topic_names.get(t, t)) for t in self.contracts if t != logical]
            others += sorted(s for s in self.registry.subjects() if s != mine and s not in others)
            for subject in others:
                ids = [v.schema_id for v in self.registry.versions(subject) if v.schema_id not in own_ids]
                if ids:
                    self._foreign_ids[logical] = ids[-1]
                    break
            else:
                raise ValueError(f"{SUBJECT_MISMATCH} needs a schema registered under a subject other than {mine}")
        return self._foreign_ids[logical]

    def encode(self, record: Record) -> bytes:
        topic = self.topic_names.get(record.topic, record.topic)
        contract = self.contracts[record.topic]
        framed = self.serializers[record.topic](self._values(contract, record.event),
                                                SerializationContext(topic, MessageField.VALUE))
        body = framed[5:]
        if record.kind == WRONG_MAGIC_BYTE:
            return b"\x01" + framed[1:]
        if record.kind == TRUNCATED_HEADER:
            return framed[:3]
        if record.kind == UNKNOWN_SCHEMA_ID:
            return encode_wire(UNKNOWN_ID, body)
        if record.kind == CORRUPT_PAYLOAD:
            return framed[: 5 + len(body) // 2]  # the body cut in half: decoding runs out of bytes
        if record.kind == SUBJECT_MISMATCH:
            return encode_wire(self.foreign_id(record.topic), body)
        return framed


class AccountsTableWriter:
    """Applies the generator's account changes (:data:`ACCOUNTS` records) to the accounts table
    through ``connection`` (a psycopg connection as the table's owner), each change committed in
    a transaction of its own, as the account service would. An insert of a row that exists (the
    same seed run again) updates it."""

    _UPSERT = ("insert into accounts (account_id, status, credit_limit, home_country, updated_at) "
               "values (%(account_id)s, %(status)s, %(credit_limit)s, %(home_country)s, now()) "
               "on conflict (account_id) do update set status = excluded.status, credit_limit = "
               "excluded.credit_limit, home_country = excluded.home_country, updated_at = excluded.updated_at")
    _UPDATE = ("update accounts set status = %(status)s, credit_limit = %(credit_limit)s, "
               "home_country = %(home_country)s, updated_at = now() where account_id = %(account_id)s")
    _DELETE = "delete from accounts where account_id = %(account_id)s"

    def __init__(self, connection):
        self.connection = connection

    def __call__(self, record: Record) -> None:
        statement = {"insert": self._UPSERT, "update": self._UPDATE, "delete": self._DELETE}[record.kind]
        self.connection.execute(statement, dict(record.event))
        self.connection.commit()


def produce(records: Iterable[Record], producer_config: Mapping[str, str], rate: float = 0.0,
            topic_names: Mapping[str, str] | None = None, progress_every: int = 100_000,
            encoder: AvroEncoder | None = None,
            accounts_table: Callable[[Record], None] | None = None) -> GeneratorSummary:
    """Send ``records`` with an idempotent producer (no retry duplicates); every delivery is
    confirmed before returning, and any failed delivery raises.

    ``topic_names`` maps the generator's logical topics (transactions, labels) to the topics
    to write; the summary counts by the topics written. Avro records (``value`` None) are
    encoded by ``encoder``. Account changes go to ``accounts_table`` (e.g. an
    :class:`AccountsTableWriter`) in their place in the stream, at the same rate.
    """
    topic_names = topic_names or {}
    producer = Producer(
        {
            # Every record on all in-sync replicas before it counts as sent (librdkafka's default too).
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 20,
            "compression.type": "lz4",
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 500_000,
            "message.max.bytes": 10_485_760,
            **producer_config,
        }
    )
    summary = GeneratorSummary()
    failures: list[str] = []

    def on_delivery(err, msg) -> None:
        if err is not None:
            failures.append(f"{msg.topic()}: {err}")

    started = time.monotonic()
    for n, record in enumerate(records, 1):
        if record.topic == ACCOUNTS:
            if accounts_table is None:
                raise ValueError("the records hold account changes (account_change_rate) and no accounts table "
                                 "to write them to")
            accounts_table(record)
            summary.add(ACCOUNTS, record.kind)
            continue
        topic = topic_names.get(record.topic, record.topic)
        value = record.value
        if value is None:
            if encoder is None:
                raise ValueError(f"{record.topic}: an Avro record and no AvroEncoder to encode it")
            value = encoder.encode(record)
        while True:
            try:
                producer.produce(topic, value=value, key=record.key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)
        summary.add(topic, record.kind)
        producer.poll(0)
        if rate > 0:
            ahead = n / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        if progress_every and n % progress_every == 0:
            log.info("sent %d records (%.0f/s)", n, n / max(time.monotonic() - started, 1e-9))
    remaining = producer.flush(120)
    if remaining or failures:
        raise RuntimeError(
            f"{remaining} records undelivered, {len(failures)} failed: {failures[:5]}"
        )
    return summary
