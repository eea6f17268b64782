"""JSON topics into the bronze layer: each record's raw bytes checked against its contract in
Spark SQL expressions (no Python per record), giving the typed fields or an error class and
reason. The rules and their order are those of :mod:`pipelines.contracts.validation`. The Avro
counterpart is :mod:`pipelines.ingest.avro_records`; both return the same columns, so everything
downstream is shared (:mod:`pipelines.ingest.bronze`), and the online path
(:mod:`pipelines.features.live_stream`) rejects exactly what the bronze ingest rejects.

How strict JSON is decided in the JVM. Spark's ``parse_json`` (Jackson) rejects duplicate keys,
``NaN``/``Infinity``, comments, single quotes, leading zeros and raw control characters, but it
stops after the first value and ignores whatever follows (``{"a":1}{"b":2}`` would parse as
``{"a":1}``). So the text is parsed wrapped as ``[<text>\\n,1]``: a value followed by anything
but whitespace no longer parses, and the array must hold exactly two elements, the last being the
sentinel ``1``. A text that itself closes the array early (``{"a":1},1]garbage``) can only do so
with a ``]``; a text holding one is also parsed as ``[<text>\\n,2]`` and must end in ``2`` there
too, which no early-closed prefix can do for both sentinels. Element 0 is the record.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from pipelines.contracts.spark_schema import spark_type
from pipelines.contracts.validation import ValidationRules
from pipelines.core.contract_spec import Contract, ContractField
from pipelines.core.times import SECOND, describe_duration, micros
from pipelines.ingest.records import kafka_records

#: Event-time text accepted for a ``timestamp`` field (RFC 3339 with minutes-only time and a
#: compact offset allowed): date, ``T``, ``HH:MM[:SS[.fraction]]`` (fraction of 1-9 digits,
#: ``.`` or ``,``; cut to microseconds), then ``Z`` or an offset ``+HH:MM``, ``+HHMM`` or ``+HH``.
TIMESTAMP_PATTERN = r"^(\d{4}-\d{2}-\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?(Z|[+-]\d{2}(?::?\d{2})?)$"
_SNIPPET = 40
_INTEGRAL = ("TINYINT", "SMALLINT", "INT", "BIGINT")
_EXPECTED = {
    "string": "a string",
    "double": "a finite number",
    "long": "a 64-bit integer",
    "boolean": "true or false",
    "timestamp": "an ISO-8601 timestamp string with a UTC offset",
}


def _any(conditions: Sequence[Column]) -> Column:
    """True where any condition is true (a null condition counts as false)."""
    return functools.reduce(operator.or_, [F.coalesce(c, F.lit(False)) for c in conditions], F.lit(False))


def _joined(parts: Sequence[tuple[Column, Column]]) -> Column:
    """The messages of the parts whose condition holds, joined with "; " (empty if none)."""
    return F.concat_ws("; ", *[F.when(cond, msg) for cond, msg in parts])


def _first_error(checks: Sequence[tuple[Column, str, Column]]) -> tuple[Column, Column]:
    """(error_class, error_reason) of the first check whose condition holds; nulls if none."""
    error_class, reason = F.lit(None).cast("string"), F.lit(None).cast("string")
    for condition, name, message in reversed(checks):
        error_class = F.when(condition, F.lit(name)).otherwise(error_class)
        reason = F.when(condition, message).otherwise(reason)
    return error_class, reason


def _quoted(name: str) -> str:
    """``name`` as Python's ``repr`` quotes an identifier (the reasons' style)."""
    return repr(name)


def _snippet(json_text: Column) -> Column:
    """A JSON text cut to 40 characters (37 and ``...``), as reasons quote values."""
    return F.when(F.char_length(json_text) <= _SNIPPET, json_text).otherwise(
        F.concat(F.substring(json_text, 1, _SNIPPET - 3), F.lit("...")))


def _json_type(type_name: Column) -> Column:
    """The JSON type named in reasons, from ``schema_of_variant``'s type name."""
    return (F.when(type_name == "STRING", "string").when(type_name == "BOOLEAN", "boolean")
            .when(type_name.startswith("OBJECT"), "object").when(type_name.startswith("ARRAY"), "array")
            .when(type_name == "VOID", "null").otherwise("number"))


def _duration_text(delta_micros: Column) -> Column:
    """:func:`pipelines.core.times.describe_duration` at whole seconds, in SQL, for a
    non-negative number of microseconds: ``22d 12h``, ``5m 1s``, ``0s``."""
    seconds = F.floor(delta_micros / 1_000_000).cast("long")
    parts = [(seconds / 86_400, "d"), (seconds % 86_400 / 3_600, "h"), (seconds % 3_600 / 60, "m"),
             (seconds % 60, "s")]
    text = F.concat_ws(" ", *[F.when(F.floor(v) > 0, F.concat(F.floor(v).cast("string"), F.lit(u)))
                              for v, u in parts])
    return F.when(text == "", F.lit("0s")).otherwise(text)


def _isoformat(moment: Column) -> Column:
    """A UTC timestamp as Python's ``datetime.isoformat()`` writes it: microseconds only when
    not zero, ``+00:00`` (the session time zone is UTC)."""
    fraction = F.unix_micros(moment) % 1_000_000
    return F.concat(
        F.date_format(moment, "yyyy-MM-dd'T'HH:mm:ss"),
        F.when(fraction != 0, F.concat(F.lit("."), F.lpad(fraction.cast("string"), 6, "0"))).otherwise(F.lit("")),
        F.lit("+00:00"),
    )


def parse_timestamp(text: Column) -> Column:
    """A timestamp text in :data:`TIMESTAMP_PATTERN` -> UTC timestamp; null for any other text
    or an impossible date or time (February 30, hour 24, second 60)."""
    def group(i: int) -> Column:
        return F.regexp_extract(text, TIMESTAMP_PATTERN, i)

    date, second, fraction, offset = group(1), group(4), group(5), group(6)
    offset_text = (F.when(offset == "Z", F.lit("+00:00"))
                   .when(F.length(offset) == 3, F.concat(offset, F.lit(":00")))
                   .when(F.length(offset) == 5, F.concat(F.substring(offset, 1, 3), F.lit(":"), F.substring(offset, 4, 2)))
                   .otherwise(offset))
    whole = F.when(second == "", F.lit("00")).otherwise(second)
    seconds = F.concat(whole, F.lit("."), F.rpad(F.substring(fraction, 1, 6), 6, "0")).cast("decimal(8,6)")
    parsed = F.call_function(
        "try_make_timestamp",
        F.substring(date, 1, 4).cast("int"), F.substring(date, 6, 2).cast("int"), F.substring(date, 9, 2).cast("int"),
        group(2).cast("int"), group(3).cast("int"), seconds, offset_text,
    )
    return F.when(text.rlike(TIMESTAMP_PATTERN) & (whole.cast("int") < 60), parsed)


def _not_utf8_position(value: Column) -> Column:
    """The byte offset of the first invalid UTF-8 sequence of ``value`` (where the bytes of its
    repaired form, ``make_valid_utf8``, first differ from the original)."""
    original = F.regexp_extract_all(F.hex(value), F.lit("(..)"), 1)
    repaired = F.regexp_extract_all(
        F.hex(F.encode(F.call_function("make_valid_utf8", value.cast("string")), "UTF-8")), F.lit("(..)"), 1)
    same = F.zip_with(original, repaired, lambda a, b: F.coalesce(a == b, F.lit(False)))
    return F.array_position(same, False) - 1


def json_verdicts(with_text: DataFrame, contract: Contract, rules: ValidationRules,
                  value: str = "kafka_value", batch_time: str = "validated_at") -> DataFrame:
    """``with_text`` plus every contract field (typed, null for invalid records),
    ``error_class`` and ``error_reason`` (null exactly when the record is valid), for the raw
    JSON bytes in column ``value`` checked against ``contract`` at the batch time in column
    ``batch_time``. Only columns prefixed ``_json`` are added on the way, and dropped."""
    raw = F.col(value)
    size = F.octet_length(raw)
    utf8 = F.call_function("is_valid_utf8", raw)
    text = F.when(raw.isNotNull() & (size <= rules.max_value_bytes) & utf8, raw.cast("string"))
    parsed = with_text.withColumn("_json_text", text).withColumn(
        "_json_doc", F.call_function("try_parse_json", F.concat(F.lit("["), F.col("_json_text"), F.lit("\n,1]"))))
    text, doc = F.col("_json_text"), F.col("_json_doc")

    def at(path: str, type_name: str = "variant") -> Column:
        return F.call_function("try_variant_get", doc, F.lit(path), F.lit(type_name))

    single = doc.isNotNull() & (at("$[1]", "int") == 1) & at("$[2]").isNull()
    unforgeable = F.when(~text.contains("]"), F.lit(True)).otherwise(
        F.call_function("try_variant_get", F.call_function(
            "try_parse_json", F.concat(F.lit("["), text, F.lit("\n,2]"))), F.lit("$[1]"), F.lit("int")) == 2)
    first_char = F.regexp_extract(text, r"^[ \t\r\n]*(.)", 1)
    is_object = first_char == "{"

    fields = contract.fields
    slots = {f.name: f"_json_v_{i}" for i, f in enumerate(fields)}
    keys = F.call_function("json_object_keys", text)
    declared = F.array(*[F.lit(n) for n in contract.field_names])
    checked = parsed.withColumns({
        "_json_single": single & F.coalesce(unforgeable, F.lit(False)),
        "_json_object": is_object,
        "_json_first": first_char,
        **{slots[f.name]: at(f"$[0]['{f.name}']") for f in fields},
    }).withColumn(
        "_json_keys", F.when(F.col("_json_single") & F.col("_json_object"), keys))
    present = {f.name: F.col(slots[f.name]).isNotNull() for f in fields}
    kind = {f.name: F.call_function("schema_of_variant", F.col(slots[f.name])) for f in fields}
    checked = checked.withColumns({f"{slots[f.name]}_type": kind[f.name] for f in fields})
    kind = {f.name: F.col(f"{slots[f.name]}_type") for f in fields}

    required = [f for f in fields if f.required]
    unknown = F.filter(F.col("_json_keys"), lambda k: ~F.array_contains(declared, k))
    missing = [f for f in required]

    def typed(f: ContractField) -> Column:
        slot = F.col(slots[f.name])
        if f.type == "string":
            return F.when(kind[f.name] == "STRING", F.call_function("try_variant_get", slot, F.lit("$"), F.lit("string")))
        if f.type == "boolean":
            return F.when(kind[f.name] == "BOOLEAN", F.call_function("try_variant_get", slot, F.lit("$"), F.lit("boolean")))
        if f.type == "long":
            return F.when(kind[f.name].isin(*_INTEGRAL), F.call_function("try_variant_get", slot, F.lit("$"), F.lit("bigint")))
        if f.type == "double":
            number = F.call_function("try_variant_get", slot, F.lit("$"), F.lit("double"))
            numeric = kind[f.name].isin(*_INTEGRAL, "DOUBLE", "FLOAT") | kind[f.name].startswith("DECIMAL")
            return F.when(numeric & ~F.isnan(number) & (F.abs(number) != float("inf")), number)
        return F.when(kind[f.name] == "STRING",
                      parse_timestamp(F.call_function("try_variant_get", slot, F.lit("$"), F.lit("string"))))

    values = checked.withColumns({f"{slots[f.name]}_typed": typed(f) for f in fields})
    typed_value = {f.name: F.col(f"{slots[f.name]}_typed") for f in fields}
    given = {f.name: present[f.name] & (kind[f.name] != "VOID") for f in fields}

    def shown(f: ContractField) -> Column:
        """The value as the reasons quote it: its JSON text (a non-finite number as written)."""
        as_json = F.call_function("to_json", F.col(slots[f.name]))
        # A fractional literal is a float to Python (``-6.0``); the variant keeps it as a
        # decimal with the trailing zeros dropped (``-6``).
        as_json = F.when(kind[f.name].startswith("DECIMAL") & ~as_json.contains("."),
                         F.concat(as_json, F.lit(".0"))).otherwise(as_json)
        if f.type == "double":
            as_json = F.when(as_json.isin('"Infinity"', '"-Infinity"'),
                             F.get_json_object(text, f"$['{f.name}']")).otherwise(as_json)
        return _snippet(as_json)

    wrong_type = {f.name: given[f.name] & typed_value[f.name].isNull() for f in fields}
    negative = {f.name: typed_value[f.name] < 0 for f in fields if f.non_negative}
    event_name = contract.event_time_field
    event_time = typed_value[event_name]
    now = F.col(batch_time)
    ahead = F.unix_micros(event_time) - F.unix_micros(now)
    n_unknown = F.coalesce(F.size(unknown), F.lit(0))
    n_missing = functools.reduce(operator.add, [F.when(~present[f.name], 1).otherwise(0) for f in missing], F.lit(0))
    missing_text = _joined([(~present[f.name], F.lit(f"required field {_quoted(f.name)} is missing")) for f in missing])

    def unknown_text(suffix: str) -> Column:
        return F.array_join(F.transform(unknown, lambda k: F.concat(
            F.lit("undeclared field '"), k, F.lit(f"'{suffix}"))), "; ")

    def with_unknown(suffix: str) -> Column:
        return F.when(n_unknown > 0, F.concat(missing_text, F.lit("; "), unknown_text(suffix))).otherwise(missing_text)

    # The first key seen a second time, reading the object from the start.
    keys_read = F.call_function("json_object_keys", text)
    repeated = F.filter(keys_read, lambda k, i: F.array_contains(F.slice(keys_read, 1, i), k))
    tolerance_text = describe_duration(rules.future_tolerance, SECOND)
    horizon_text = describe_duration(rules.max_event_age, SECOND)
    # The conditions first, as plain columns, so that the two CASE chains below stay small
    # (the optimizer runs again on every micro-batch).
    flagged = values.withColumns({
        "_json_c0": raw.isNull(),
        "_json_c1": size > rules.max_value_bytes,
        "_json_c2": ~utf8,
        "_json_c3": text.rlike(r"^\s*$"),
        "_json_c4": ~F.col("_json_single"),
        "_json_c5": ~F.col("_json_object"),
        "_json_n_unknown": n_unknown,
        "_json_n_missing": n_missing,
        "_json_c8": _any([~given[f.name] for f in required]),
        "_json_c9": _any(list(wrong_type.values())),
        "_json_c10": _any(list(negative.values())),
        "_json_ahead": ahead,
    })
    flag = {i: F.col(f"_json_c{i}") for i in (0, 1, 2, 3, 4, 5, 8, 9, 10)}
    n_unknown, n_missing, ahead = F.col("_json_n_unknown"), F.col("_json_n_missing"), F.col("_json_ahead")
    error_class, reason = _first_error([
        (flag[0], "not_json", F.lit("value is null (a tombstone), expected a JSON object")),
        (flag[1], "oversize",
         F.format_string(f"value is %d bytes, over the limit of {rules.max_value_bytes} bytes", size)),
        (flag[2], "not_utf8", F.format_string("value is not UTF-8: invalid byte at position %d", _not_utf8_position(raw))),
        (flag[3], "not_json", F.lit("value is empty, expected a JSON object")),
        (flag[4], "not_json",
         F.when(F.size(repeated) > 0, F.format_string("value has the key '%s' twice", F.element_at(repeated, 1)))
         .when(F.call_function("try_parse_json", text).isNotNull(),
               F.lit("value is not JSON: extra data after the first JSON value"))
         .otherwise(F.lit("value is not JSON: invalid syntax (or NaN, Infinity, a comment, a control character)"))),
        (flag[5], "not_json", F.format_string(
            "value is a JSON %s, expected an object",
            F.when(F.col("_json_first") == "[", "array").when(F.col("_json_first") == '"', "string")
            .when(F.col("_json_first").isin("t", "f"), "boolean").when(F.col("_json_first") == "n", "null")
            .otherwise("number"))),
        # As many undeclared fields as missing ones: the shape of an upstream rename.
        ((n_missing > 0) & (n_unknown > 0) & (n_missing <= n_unknown), "renamed_field",
         with_unknown(" is present (renamed upstream?)")),
        (n_missing > 0, "missing_field", with_unknown(" is present")),
        (F.lit(contract.strict) & (n_unknown > 0), "unknown_field",
         unknown_text(f" (contract {_quoted(contract.name)} v{contract.version} is strict)")),
        (flag[8], "null_field",
         _joined([(~given[f.name], F.lit(f"required field {_quoted(f.name)} is null")) for f in required])),
        (flag[9], "wrong_type", _joined([
            (wrong_type[f.name], F.format_string(f"field {_quoted(f.name)} must be {_EXPECTED[f.type]}, got %s %s",
                                                 _json_type(kind[f.name]), shown(f))) for f in fields])),
        (flag[10], "negative_value", _joined([
            (cond, F.format_string(f"field {_quoted(name)} must not be negative, got %s", shown(contract.field(name))))
            for name, cond in negative.items()])),
        (ahead > micros(rules.future_tolerance), "future_event_time", F.format_string(
            f"{event_name} %s is %s ahead of the batch time %s, beyond the tolerance of {tolerance_text}",
            _isoformat(event_time), _duration_text(ahead), _isoformat(now))),
        (-ahead > micros(rules.max_event_age), "stale_event_time", F.format_string(
            f"{event_name} %s is %s behind the batch time %s, beyond the horizon of {horizon_text}",
            _isoformat(event_time), _duration_text(-ahead), _isoformat(now))),
    ])
    judged = flagged.withColumns({"error_class": error_class, "error_reason": reason})
    valid = F.col("error_class").isNull()
    return judged.select(
        *with_text.columns,
        *[F.when(valid, typed_value[f.name]).cast(spark_type(f)).alias(f.name) for f in fields],
        "error_class", "error_reason",
    )


def validate_records(
    records: DataFrame,
    contract: Contract,
    rules: ValidationRules,
    batch_time: Column | None = None,
) -> DataFrame:
    """Kafka-shaped rows -> one row per record with the contract's typed fields and its verdict.

    Input columns: ``key, value, topic, partition, offset, timestamp`` and optionally
    ``headers`` (as the Kafka source gives them). Output: those columns renamed ``kafka_*``,
    ``validated_at`` (the batch time, ``current_timestamp()`` unless ``batch_time`` is given),
    every contract field (null for invalid records), ``error_class`` and ``error_reason``
    (both null exactly when the record is valid). ``kafka_value`` is kept for invalid records
    only (valid ones are fully represented by their fields). No record is dropped.
    """
    with_time = kafka_records(records, batch_time)
    checked = json_verdicts(with_time, contract, rules)
    return checked.select(
        *[F.col(c) for c in with_time.columns if c != "kafka_value"],
        # Only dead letters need the original bytes; dropping them from valid rows halves what
        # the duplicate filter shuffles and keeps in memory.
        F.when(F.col("error_class").isNotNull(), F.col("kafka_value")).alias("kafka_value"),
        *[F.col(n) for n in (*contract.field_names, "error_class", "error_reason")],
    )
