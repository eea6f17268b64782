"""JSON topics into the bronze layer: each record's raw bytes checked against its contract in
Spark SQL expressions (no Python per record), giving the typed fields or an error class and
reason. The rules and their order are those of :mod:`pipelines.contracts.validation`. The Avro
counterpart is :mod:`pipelines.ingest.avro_records`; both return the same columns, so everything
downstream is shared (:mod:`pipelines.ingest.bronze`), and the live path
(:mod:`pipelines.features.live_stream`) rejects exactly what the bronze ingest rejects.

How strict JSON is decided in the JVM. Spark's ``parse_json`` (Jackson) rejects duplicate keys,
``NaN``/``Infinity``, comments, single quotes, leading zeros and raw control characters, but it
stops after the first value and ignores whatever follows (``{"a":1}{"b":2}`` would parse as
``{"a":1}``). So the text is parsed wrapped as ``[<text>\\n,"~"]``: a value followed by anything
but whitespace no longer parses, and the array must hold exactly two elements, the last being the
sentinel ``"~"``. A text that itself closes the array early (``{"a":1},"~"]garbage``) can only do
so with a ``]``; a text holding one is also parsed as ``[<text>\\n,"~~"]`` and must end in ``"~~"``
there too, which no early-closed prefix can do for both sentinels. Element 0 is the record.

The values themselves come from Spark's JSON reader (``from_json`` into a map of texts) and SQL
casts, each used only where the strict parse says the JSON type is the field's: casting a
variant number with ``variant_get`` builds a literal per row in Spark 4.2, several times slower.
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

#: Event-time text accepted for a ``timestamp`` field (RFC 3339, with minutes-only times and
#: compact offsets allowed): date, ``T``, ``HH:MM[:SS[.fraction]]`` (a fraction of 1-9 digits,
#: cut to microseconds), then ``Z`` or an offset ``+HH:MM``, ``+HHMM`` or ``+HH``.
TIMESTAMP_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}(:?\d{2})?)$"
#: The same shape for Spark's (strict) datetime parser, which also refuses impossible dates and
#: times: February 30, hour 24, second 60.
_TIMESTAMP_FORMAT = "yyyy-MM-dd'T'HH:mm[:ss][.SSSSSSSSS][XXX][XX][X]"
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
    or an impossible date or time (February 30, hour 24, second 60). Spark's own cast parses
    the usual shapes fast; the datetime parser takes the rest (times without seconds)."""
    return F.when(text.rlike(TIMESTAMP_PATTERN), F.coalesce(
        text.try_cast("timestamp"), F.call_function("try_to_timestamp", text, F.lit(_TIMESTAMP_FORMAT))))


def _not_utf8_position(value: Column) -> Column:
    """The byte offset of the first invalid UTF-8 sequence of ``value``: the UTF-8 length of
    what precedes the first replacement character of its repaired form (``make_valid_utf8``).
    A U+FFFD already in the text before the invalid bytes would be found first."""
    repaired = F.call_function("make_valid_utf8", value.cast("string"))
    before = F.substring(repaired, F.lit(1), F.instr(repaired, "\ufffd") - 1)
    return F.octet_length(before)


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
        "_json_doc", F.call_function("try_parse_json", F.concat(F.lit("["), F.col("_json_text"), F.lit('\n,"~"]'))))
    text, doc = F.col("_json_text"), F.col("_json_doc")

    def at(path: str, type_name: str = "variant") -> Column:
        return F.call_function("try_variant_get", doc, F.lit(path), F.lit(type_name))

    single = doc.isNotNull() & (at("$[1]", "string") == "~") & at("$[2]").isNull()
    unforgeable = F.when(~text.contains("]"), F.lit(True)).otherwise(
        F.call_function("try_variant_get", F.call_function(
            "try_parse_json", F.concat(F.lit("["), text, F.lit('\n,"~~"]'))), F.lit("$[1]"), F.lit("string")) == "~~")
    # Per field: its JSON type from the strict parse (schema_of_variant of the value: STRING,
    # BIGINT, DECIMAL(3,1), DOUBLE, BOOLEAN, VOID for null...), its text from Spark's JSON reader
    # (a map of the object's keys to texts, which also counts the keys). The reader's leniency
    # does not matter: a text is only used when the strict parse accepted the record and the
    # JSON type is the field's.
    fields = contract.fields
    slots = {f.name: f"_json_v_{i}" for i, f in enumerate(fields)}
    declared = F.array(*[F.lit(n) for n in contract.field_names])
    first = F.regexp_extract(text, r"^[ \t\r\n]*(.)", 1)
    checked = parsed.withColumns({
        "_json_single": single & F.coalesce(unforgeable, F.lit(False)),
        "_json_object": first == "{",
        **{f"{slots[f.name]}_type": F.call_function("schema_of_variant", at(f"$[0]['{f.name}']")) for f in fields},
    }).withColumn("_json_read", F.when(F.col("_json_single") & F.col("_json_object"),
                                       F.from_json(text, "map<string,string>")))
    kind = {f.name: F.col(f"{slots[f.name]}_type") for f in fields}
    present = {f.name: kind[f.name].isNotNull() for f in fields}
    # Reasons only: the keys as written, in order (json_object_keys builds a parser per call).
    keys = F.call_function("json_object_keys", text)

    required = [f for f in fields if f.required]
    unknown = F.filter(keys, lambda k: ~F.array_contains(declared, k))

    def typed(f: ContractField) -> Column:
        read = F.element_at(F.col("_json_read"), F.lit(f.name))  # the value's text (a string unquoted)
        if f.type == "string":
            return F.when(kind[f.name] == "STRING", read)
        if f.type == "timestamp":
            return F.when(kind[f.name] == "STRING", parse_timestamp(read))
        if f.type == "boolean":
            return F.when(kind[f.name] == "BOOLEAN", read == "true")
        if f.type == "long":
            return F.when(kind[f.name].isin(*_INTEGRAL), read.try_cast("bigint"))
        number = read.try_cast("double")
        numeric = kind[f.name].isin(*_INTEGRAL, "DOUBLE", "FLOAT") | kind[f.name].startswith("DECIMAL")
        return F.when(numeric & ~F.isnan(number) & (F.abs(number) != float("inf")), number)

    values = checked.withColumns({f"{slots[f.name]}_typed": typed(f) for f in fields})
    typed_value = {f.name: F.col(f"{slots[f.name]}_typed") for f in fields}
    given = {f.name: present[f.name] & (kind[f.name] != "VOID") for f in fields}

    def shown(f: ContractField) -> Column:
        """The value as the reasons quote it: its JSON text (a non-finite number as written)."""
        as_json = F.call_function("to_json", at(f"$[0]['{f.name}']"))
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
    # A table's rows (format: debezium) have no event time of their own: no time checks.
    event_name = contract.event_time_field
    event_time = typed_value[event_name] if event_name else F.lit(None).cast("timestamp")
    now = F.col(batch_time)
    ahead = F.unix_micros(event_time) - F.unix_micros(now)
    # The keys are distinct here (a repeated key is not JSON), so the undeclared ones are the
    # keys less the declared ones present: no per-key lambda on the valid path.
    n_present = functools.reduce(operator.add, [F.when(present[f.name], 1).otherwise(0) for f in fields], F.lit(0))
    n_unknown = F.when(F.col("_json_read").isNotNull(), F.size(F.col("_json_read")) - n_present).otherwise(F.lit(0))
    n_missing = functools.reduce(operator.add, [F.when(~present[f.name], 1).otherwise(0) for f in required], F.lit(0))
    missing_text = _joined([(~present[f.name], F.lit(f"required field {_quoted(f.name)} is missing")) for f in required])

    def unknown_text(suffix: str) -> Column:
        return F.concat(F.lit("undeclared field '"), F.array_join(unknown, f"'{suffix}; undeclared field '"),
                        F.lit(f"'{suffix}"))

    def with_unknown(suffix: str) -> Column:
        return F.when(n_unknown > 0, F.concat(missing_text, F.lit("; "), unknown_text(suffix))).otherwise(missing_text)

    # The first key seen a second time, reading the object from the start.
    repeated = F.filter(keys, lambda k, i: F.array_contains(F.slice(keys, 1, i), k))
    tolerance_text = describe_duration(rules.future_tolerance, SECOND)
    horizon_text = describe_duration(rules.max_event_age, SECOND)
    # The class: one CASE over conditions the valid path needs anyway, in one code-generated
    # stage. The reason: in a projection of its own, only for invalid rows, with lambdas that
    # keep it out of whole-stage code generation (its text building would push the stage's
    # generated code past the JVM's 64 KB method limit, and the whole stage would fall back
    # to slow interpreted evaluation). Its CASE reads error_class many times, so the optimizer
    # does not merge it into the stage below.
    classes = [
        (raw.isNull() | (size > rules.max_value_bytes) | ~utf8 | F.col("_json_read").isNull(),
         F.when(raw.isNotNull() & (size > rules.max_value_bytes), "oversize")
         .when(raw.isNotNull() & ~utf8, "not_utf8").otherwise("not_json")),
        # As many undeclared fields as missing ones: the shape of an upstream rename.
        ((n_missing > 0) & (n_unknown > 0) & (n_missing <= n_unknown), F.lit("renamed_field")),
        (n_missing > 0, F.lit("missing_field")),
        (F.lit(contract.strict) & (n_unknown > 0), F.lit("unknown_field")),
        (_any([~given[f.name] for f in required]), F.lit("null_field")),
        (_any(list(wrong_type.values())), F.lit("wrong_type")),
        (_any(list(negative.values())), F.lit("negative_value")),
        *([(ahead > micros(rules.future_tolerance), F.lit("future_event_time")),
           (-ahead > micros(rules.max_event_age), F.lit("stale_event_time"))] if event_name else []),
    ]
    error_class = F.lit(None).cast("string")
    for condition, name in reversed(classes):
        error_class = F.when(condition, name).otherwise(error_class)
    classified = values.withColumn("error_class", error_class)
    error_class = F.col("error_class")
    reasons = {
        "oversize": F.format_string(f"value is %d bytes, over the limit of {rules.max_value_bytes} bytes", size),
        "not_utf8": F.format_string("value is not UTF-8: invalid byte at position %d", _not_utf8_position(raw)),
        "not_json": F.when(raw.isNull(), F.lit("value is null (a tombstone), expected a JSON object"))
        .when(text.rlike(r"^\s*$"), F.lit("value is empty, expected a JSON object"))
        .when(F.size(repeated) > 0, F.format_string("value has the key '%s' twice", F.element_at(repeated, 1)))
        .when(~F.col("_json_single") & F.call_function("try_parse_json", text).isNotNull(),
              F.lit("value is not JSON: extra data after the first JSON value"))
        .when(~F.col("_json_single"),
              F.lit("value is not JSON: invalid syntax (or NaN, Infinity, a comment, a control character)"))
        .otherwise(F.format_string(
            "value is a JSON %s, expected an object",
            F.when(first == "[", "array").when(first == '"', "string").when(first.isin("t", "f"), "boolean")
            .when(first == "n", "null").otherwise("number"))),
        "renamed_field": with_unknown(" is present (renamed upstream?)"),
        "missing_field": with_unknown(" is present"),
        "unknown_field": unknown_text(f" (contract {_quoted(contract.name)} v{contract.version} is strict)"),
        "null_field": _joined([(~given[f.name], F.lit(f"required field {_quoted(f.name)} is null")) for f in required]),
        "wrong_type": _joined([
            (wrong_type[f.name], F.format_string(f"field {_quoted(f.name)} must be {_EXPECTED[f.type]}, got %s %s",
                                                 _json_type(kind[f.name]), shown(f))) for f in fields]),
        "negative_value": _joined([
            (cond, F.format_string(f"field {_quoted(name)} must not be negative, got %s", shown(contract.field(name))))
            for name, cond in negative.items()]),
        "future_event_time": F.format_string(
            f"{event_name} %s is %s ahead of the batch time %s, beyond the tolerance of {tolerance_text}",
            _isoformat(event_time), _duration_text(ahead), _isoformat(now)),
        "stale_event_time": F.format_string(
            f"{event_name} %s is %s behind the batch time %s, beyond the horizon of {horizon_text}",
            _isoformat(event_time), _duration_text(-ahead), _isoformat(now)),
    }
    reason = F.lit(None).cast("string")
    for name, message in reversed(list(reasons.items())):
        reason = F.when(error_class == name, message).otherwise(reason)
    judged = classified.withColumn("error_reason", reason)
    valid = error_class.isNull()
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
