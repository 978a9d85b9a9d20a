//! Issue 2: the mirror engine and `monoshot`.

use crate::common::*;

#[test]
fn mirrors_a_mixed_tree_exactly() {
    let env = Env::new();
    gen_tree(&env.src, 1, 60);
    env.mirror_ok(&[]);
    assert_no_temps(&env.rep);
}
