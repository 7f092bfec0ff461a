-- The floor of any trigger-based fold: the bare table plus an AFTER INSERT
-- statement trigger with a NEW transition table whose function does nothing.
-- PostgreSQL still fires it and captures every inserted row for it, so what a
-- trigger-based fold costs beyond this contender is the fold's own work.
-- Installed after bare.sql (usage_agg's fold triggers already dropped).
CREATE FUNCTION public.empty_fold() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RETURN NULL;
END
$$;

CREATE TRIGGER empty_fold AFTER INSERT ON usage_agg.key_usage_logs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION public.empty_fold();
