-- EXAMPLE ONLY, written 2026-12-04. Not a price list to rely on: these are
-- list prices (USD per million tokens) that providers published in 2024-2025
-- for a few models, to show the shape of usage_agg.model_prices. Prices
-- change; enter what you pay, with the instant it applies from. See
-- docs/prices.md.
--
-- A kind left NULL has no price: a call with tokens of that kind stays
-- unpriced (listed in usage_agg.unpriced_calls) instead of being counted free.
INSERT INTO usage_agg.model_prices
    (model, valid_from, input_per_mtok, output_per_mtok, cache_read_per_mtok, cache_write_per_mtok, per_call)
VALUES
    -- OpenAI: cached prompt tokens are billed at a lower rate; no cache writes.
    ('gpt-4o',            '2024-10-01 00:00+00', 2.50, 10.00, 1.25,  NULL, NULL),
    ('gpt-4o-mini',       '2024-07-18 00:00+00', 0.15,  0.60, 0.075, NULL, NULL),
    -- Anthropic: cache writes (5-minute cache) and cache reads priced apart.
    ('claude-3-5-sonnet', '2024-10-22 00:00+00', 3.00, 15.00, 0.30,  3.75, NULL),
    ('claude-3-5-haiku',  '2024-11-04 00:00+00', 0.80,  4.00, 0.08,  1.00, NULL)
ON CONFLICT (model, valid_from) DO NOTHING;
