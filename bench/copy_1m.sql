-- The same 1,000,000 calls as bulk_1m.sql, as CSV for COPY (written once by run.sh).
COPY (
SELECT ('00000000-0000-0000-0000-' || lpad((i % 10000)::text, 12, '0'))::uuid,
       ('10000000-0000-0000-0000-' || lpad((i % 20)::text, 12, '0'))::uuid,
       '/v1/chat/completions', 'model-' || (i % 3), i % 4000, (i % 4000) * 0.000002, i % 50 <> 0,
       now() - (i % 3) * interval '1 day'
  FROM generate_series(1, 1000000) i
) TO STDOUT WITH (FORMAT csv);
