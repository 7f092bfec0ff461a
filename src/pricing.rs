//! Token kinds and table prices of one call, as plain functions.
//!
//! The kinds are disjoint: `input_tokens` are the uncached prompt tokens,
//! `cache_read_tokens` and `cache_write_tokens` the prompt tokens read from and
//! written to a provider's cache, `output_tokens` everything generated
//! (reasoning included). `tokens_used` is their sum: given alone it is the
//! total as before, left NULL with kinds given it becomes their sum, and given
//! with kinds it must equal their sum (a CHECK constraint refuses the rest).
//!
//! A price row gives a price per million tokens of each kind and per call.
//! A call is priced from the row of its model valid at its `created_at`
//! (the latest `valid_from` not after it), exactly: no rounding anywhere. A
//! row with a price per call only prices every call. A row that prices
//! tokens leaves a call unpriced (cost NULL) when the call has tokens of a
//! kind the row has no price for, or tokens not split into kinds: a guess
//! would be a silent error. So does a model without a row valid then.

use bigdecimal::BigDecimal;

/// The four token kinds of a call, NULL (None) where not reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kinds {
    pub input: Option<i32>,
    pub output: Option<i32>,
    pub cache_read: Option<i32>,
    pub cache_write: Option<i32>,
}

impl Kinds {
    fn all(&self) -> [Option<i32>; 4] {
        [self.input, self.output, self.cache_read, self.cache_write]
    }

    /// Whether any kind was reported.
    pub fn any(&self) -> bool {
        self.all().iter().any(Option::is_some)
    }

    /// The sum of the reported kinds (kinds are not negative: a CHECK
    /// constraint refuses that, and it runs after this).
    pub fn sum(&self) -> i64 {
        self.all().iter().flatten().map(|&k| i64::from(k)).sum()
    }
}

/// `tokens_used` when the call leaves it NULL and reports kinds: their sum.
/// None means leave the row's value as it is. Err(sum) when the sum does not
/// fit the integer column.
pub fn derived_tokens_used(tokens_used: Option<i32>, kinds: &Kinds) -> Result<Option<i32>, i64> {
    if tokens_used.is_some() || !kinds.any() {
        return Ok(None);
    }
    let sum = kinds.sum();
    i32::try_from(sum).map(Some).map_err(|_| sum)
}

/// `tokens_used` after an UPDATE: their sum when the new row leaves it NULL
/// and reports kinds, and also when the kinds changed, `tokens_used` was not
/// touched and it was the sum of the old kinds (it follows them). None means
/// leave the row's value as it is (the CHECK refuses a contradiction).
pub fn updated_tokens_used(
    old_tokens: Option<i32>,
    old_kinds: &Kinds,
    new_tokens: Option<i32>,
    new_kinds: &Kinds,
) -> Result<Option<i32>, i64> {
    let followed_the_kinds = old_kinds.any() && old_tokens.map(i64::from) == Some(old_kinds.sum());
    if new_tokens.is_some()
        && new_tokens == old_tokens
        && new_kinds != old_kinds
        && followed_the_kinds
    {
        return derived_tokens_used(None, new_kinds);
    }
    derived_tokens_used(new_tokens, new_kinds)
}

/// What an UPDATE changed in a call, for `cost_action`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Changes {
    /// `cost_estimate` was set to another value.
    pub cost: bool,
    /// `price_valid_from` was set to another value.
    pub price_valid_from: bool,
    /// What the price depends on: model, `created_at`, tokens or kinds.
    pub inputs: bool,
}

/// What the pricing trigger does with a row's cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CostAction {
    /// Leave cost and `price_valid_from` as they are.
    Keep,
    /// The application set the cost of a table-priced call: it is the
    /// application's cost now, so `price_valid_from` becomes NULL.
    ClearSource,
    /// Price the call from the table (NULL when it cannot be priced).
    Price,
}

/// A row without a cost is priced from the table (on INSERT, and on an
/// UPDATE that leaves or sets the cost NULL: that is how a call is
/// repriced). A table-priced call is repriced when what its price depends on
/// changes, and becomes the application's when the application sets its
/// cost. A cost the application supplied is kept. `changes` is None for an
/// INSERT.
pub fn cost_action(cost_is_null: bool, table_priced: bool, changes: Option<Changes>) -> CostAction {
    if cost_is_null {
        return CostAction::Price;
    }
    match changes {
        Some(c) if table_priced && c.cost && !c.price_valid_from => CostAction::ClearSource,
        Some(c) if table_priced && c.inputs && !c.cost => CostAction::Price,
        _ => CostAction::Keep,
    }
}

/// One row of `usage_agg.model_prices` (`valid_from` in PostgreSQL's
/// microseconds since 2000-01-01).
#[derive(Clone, Debug, PartialEq)]
pub struct Price {
    pub valid_from: i64,
    pub input_per_mtok: Option<BigDecimal>,
    pub output_per_mtok: Option<BigDecimal>,
    pub cache_read_per_mtok: Option<BigDecimal>,
    pub cache_write_per_mtok: Option<BigDecimal>,
    pub per_call: Option<BigDecimal>,
}

impl Price {
    fn prices_tokens(&self) -> bool {
        self.input_per_mtok.is_some()
            || self.output_per_mtok.is_some()
            || self.cache_read_per_mtok.is_some()
            || self.cache_write_per_mtok.is_some()
    }
}

/// The row valid at `at` among one model's rows sorted by `valid_from`.
pub fn price_at(rows: &[Price], at: i64) -> Option<&Price> {
    let after = rows.partition_point(|p| p.valid_from <= at);
    after.checked_sub(1).map(|i| &rows[i])
}

/// The exact cost of a call at `price`, or None when it cannot be priced
/// (see the module comment).
pub fn cost(price: &Price, tokens_used: Option<i32>, kinds: &Kinds) -> Option<BigDecimal> {
    // A row that prices calls only prices every call, whatever its tokens.
    if !price.prices_tokens() {
        return price.per_call.clone().map(plain);
    }
    if !kinds.any() && tokens_used.unwrap_or(0) > 0 {
        return None;
    }
    let per_token = [
        (kinds.input, &price.input_per_mtok),
        (kinds.output, &price.output_per_mtok),
        (kinds.cache_read, &price.cache_read_per_mtok),
        (kinds.cache_write, &price.cache_write_per_mtok),
    ];
    let mut per_million = BigDecimal::from(0);
    for (count, per_mtok) in per_token {
        match (count.unwrap_or(0), per_mtok) {
            (0, _) => {}
            (n, Some(p)) => per_million += p * BigDecimal::from(n),
            (_, None) => return None,
        }
    }
    // Dividing by 10^6 is a shift of the decimal point: exact.
    let from_tokens = per_million * BigDecimal::new(1.into(), 6);
    let total = from_tokens
        + price
            .per_call
            .clone()
            .unwrap_or_else(|| BigDecimal::from(0));
    Some(plain(total))
}

/// Without trailing zeros, and never in exponent form (numeric's input takes
/// both, but aggregates show this text).
fn plain(value: BigDecimal) -> BigDecimal {
    let normalized = value.normalized();
    if normalized.fractional_digit_count() < 0 {
        normalized.with_scale(0)
    } else {
        normalized
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> BigDecimal {
        BigDecimal::from_str(s).unwrap()
    }

    fn kinds(i: i32, o: i32, r: i32, w: i32) -> Kinds {
        let k = |n: i32| (n >= 0).then_some(n);
        Kinds {
            input: k(i),
            output: k(o),
            cache_read: k(r),
            cache_write: k(w),
        }
    }

    fn price(valid_from: i64, per: [Option<&str>; 5]) -> Price {
        let p = |s: Option<&str>| s.map(d);
        Price {
            valid_from,
            input_per_mtok: p(per[0]),
            output_per_mtok: p(per[1]),
            cache_read_per_mtok: p(per[2]),
            cache_write_per_mtok: p(per[3]),
            per_call: p(per[4]),
        }
    }

    #[test]
    fn tokens_used_is_the_sum_of_the_kinds_only_when_left_null() {
        assert_eq!(
            derived_tokens_used(None, &kinds(10, 20, -1, 5)),
            Ok(Some(35))
        );
        assert_eq!(
            derived_tokens_used(Some(7), &kinds(10, 20, -1, 5)),
            Ok(None)
        );
        assert_eq!(derived_tokens_used(None, &Kinds::default()), Ok(None));
        assert_eq!(
            derived_tokens_used(None, &kinds(i32::MAX, 1, -1, -1)),
            Err(i64::from(i32::MAX) + 1)
        );
    }

    #[test]
    fn the_row_valid_at_an_instant_is_the_latest_not_after_it() {
        let rows = vec![
            price(100, [Some("1"), None, None, None, None]),
            price(200, [Some("2"), None, None, None, None]),
        ];
        assert_eq!(price_at(&rows, 99), None);
        assert_eq!(price_at(&rows, 100).unwrap().valid_from, 100);
        assert_eq!(price_at(&rows, 199).unwrap().valid_from, 100);
        assert_eq!(price_at(&rows, 200).unwrap().valid_from, 200);
        assert_eq!(price_at(&[], 200), None);
    }

    #[test]
    fn costs_are_exact_per_kind() {
        // 3 / 15 / 0.30 / 3.75 per million, 0.0001 per call.
        let p = price(
            0,
            [
                Some("3"),
                Some("15"),
                Some("0.30"),
                Some("3.75"),
                Some("0.0001"),
            ],
        );
        // 1234*3 + 567*15 + 10000*0.3 + 2000*3.75 = 3702 + 8505 + 3000 + 7500,
        // plus the call.
        assert_eq!(
            cost(&p, None, &kinds(1234, 567, 10000, 2000)),
            Some(d("0.022807"))
        );
        // A kind left NULL counts nothing; so does zero.
        assert_eq!(cost(&p, None, &kinds(1000, -1, 0, -1)), Some(d("0.0031")));
        assert_eq!(cost(&p, Some(0), &Kinds::default()), Some(d("0.0001")));
        assert_eq!(
            cost(&p, None, &kinds(1, 0, 0, 0)).unwrap().to_string(),
            "0.000103"
        );
    }

    #[test]
    fn what_cannot_be_priced_stays_unpriced() {
        let input_only = price(0, [Some("2.5"), None, None, None, None]);
        assert_eq!(cost(&input_only, None, &kinds(10, 1, -1, -1)), None);
        assert_eq!(
            cost(&input_only, None, &kinds(10, 0, -1, -1)),
            Some(d("0.000025"))
        );
        // Tokens not split into kinds, and the row prices tokens.
        assert_eq!(cost(&input_only, Some(500), &Kinds::default()), None);
        // A price per call only prices any call, whatever its tokens.
        let per_call = price(0, [None, None, None, None, Some("0.04")]);
        assert_eq!(
            cost(&per_call, Some(500), &Kinds::default()),
            Some(d("0.04"))
        );
        assert_eq!(cost(&per_call, None, &kinds(3, -1, -1, 9)), Some(d("0.04")));
    }

    #[test]
    fn costs_read_plainly() {
        let p = price(0, [None, None, None, None, Some("100.000")]);
        assert_eq!(
            cost(&p, None, &Kinds::default()).unwrap().to_string(),
            "100"
        );
        let big = price(0, [Some("1000000"), None, None, None, None]);
        assert_eq!(
            cost(&big, None, &kinds(20, -1, -1, -1))
                .unwrap()
                .to_string(),
            "20"
        );
    }

    #[test]
    fn an_update_keeps_tokens_used_following_the_kinds() {
        let old = kinds(10, 20, -1, -1);
        // It was their sum and the update changed only the kinds.
        assert_eq!(
            updated_tokens_used(Some(30), &old, Some(30), &kinds(10, 25, -1, -1)),
            Ok(Some(35))
        );
        // It was not their sum (no kinds before): left alone.
        assert_eq!(
            updated_tokens_used(
                Some(30),
                &Kinds::default(),
                Some(30),
                &kinds(10, 25, -1, -1)
            ),
            Ok(None)
        );
        // The update set tokens_used itself: left alone (the CHECK judges it).
        assert_eq!(
            updated_tokens_used(Some(30), &old, Some(31), &kinds(10, 25, -1, -1)),
            Ok(None)
        );
        // Set NULL: the sum again.
        assert_eq!(
            updated_tokens_used(Some(30), &old, None, &old),
            Ok(Some(30))
        );
        assert_eq!(
            updated_tokens_used(Some(30), &old, Some(30), &old),
            Ok(None)
        );
    }

    #[test]
    fn which_costs_the_trigger_touches() {
        use CostAction::*;
        let changed = |cost, price_valid_from, inputs| {
            Some(Changes {
                cost,
                price_valid_from,
                inputs,
            })
        };
        // INSERT: a cost given is the application's; none is the table's.
        assert_eq!(cost_action(true, false, None), Price);
        assert_eq!(cost_action(false, false, None), Keep);
        assert_eq!(cost_action(false, true, None), Keep);
        // UPDATE setting the cost NULL: priced again.
        assert_eq!(cost_action(true, true, changed(true, false, false)), Price);
        assert_eq!(cost_action(true, false, changed(false, false, true)), Price);
        // The application overwrote a table price.
        assert_eq!(
            cost_action(false, true, changed(true, false, false)),
            ClearSource
        );
        assert_eq!(
            cost_action(false, true, changed(true, false, true)),
            ClearSource
        );
        // A correction of what a table price depends on.
        assert_eq!(cost_action(false, true, changed(false, false, true)), Price);
        assert_eq!(cost_action(false, true, changed(false, false, false)), Keep);
        // An application cost is never touched.
        assert_eq!(cost_action(false, false, changed(false, false, true)), Keep);
        assert_eq!(cost_action(false, false, changed(true, false, true)), Keep);
        // Cost and source set together (a restore, or reprice by hand): kept.
        assert_eq!(cost_action(false, true, changed(true, true, false)), Keep);
    }
}
