//! Topic routing: a trie over dot-separated words, so a publish costs a walk proportional
//! to the key's length and the wildcards on its path, not one match per binding.
//! `*` matches exactly one word, `#` zero or more.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

#[derive(Debug)]
struct Node<D> {
    words: HashMap<String, Node<D>>,
    star: Option<Box<Node<D>>>,
    hash: Option<Box<Node<D>>>,
    destinations: Vec<D>,
}

impl<D> Default for Node<D> {
    fn default() -> Self {
        Self {
            words: HashMap::new(),
            star: None,
            hash: None,
            destinations: Vec::new(),
        }
    }
}

/// A set of topic bindings.
#[derive(Debug)]
pub struct TopicTrie<D> {
    root: Node<D>,
}

impl<D> Default for TopicTrie<D> {
    fn default() -> Self {
        Self {
            root: Node::default(),
        }
    }
}

impl<D: Clone + Eq + Hash> TopicTrie<D> {
    /// Adds a binding pattern.
    pub fn insert(&mut self, pattern: &str, destination: D) {
        let mut node = &mut self.root;
        for word in pattern.split('.') {
            node = match word {
                "*" => node.star.get_or_insert_with(Box::default),
                "#" => node.hash.get_or_insert_with(Box::default),
                word => node.words.entry(word.to_owned()).or_default(),
            };
        }
        if !node.destinations.contains(&destination) {
            node.destinations.push(destination);
        }
    }

    /// Every destination whose pattern matches `routing_key`.
    pub fn route(&self, routing_key: &str, out: &mut HashSet<D>) {
        let words: Vec<&str> = routing_key.split('.').collect();
        walk(&self.root, &words, out);
    }
}

fn walk<D: Clone + Eq + Hash>(node: &Node<D>, words: &[&str], out: &mut HashSet<D>) {
    if let Some(hash) = &node.hash {
        // `#` may swallow any number of words, including none.
        for skip in 0..=words.len() {
            walk(hash, &words[skip..], out);
        }
    }
    match words.split_first() {
        None => out.extend(node.destinations.iter().cloned()),
        Some((first, rest)) => {
            if let Some(child) = node.words.get(*first) {
                walk(child, rest, out);
            }
            if let Some(star) = &node.star {
                walk(star, rest, out);
            }
        }
    }
}

/// The reference semantics, one pattern at a time; used to check the trie.
#[cfg(test)]
#[must_use]
pub fn pattern_matches(pattern: &str, routing_key: &str) -> bool {
    fn matches(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| matches(rest, &key[skip..])),
            Some((&"*", rest)) => !key.is_empty() && matches(rest, &key[1..]),
            Some((word, rest)) => key.first() == Some(word) && matches(rest, &key[1..]),
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = routing_key.split('.').collect();
    matches(&pattern, &key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn route(patterns: &[&str], key: &str) -> Vec<usize> {
        let mut trie = TopicTrie::default();
        for (index, pattern) in patterns.iter().enumerate() {
            trie.insert(pattern, index);
        }
        let mut out = HashSet::new();
        trie.route(key, &mut out);
        let mut out: Vec<usize> = out.into_iter().collect();
        out.sort_unstable();
        out
    }

    #[test]
    fn rabbitmq_tutorial_cases() {
        let patterns = ["*.orange.*", "*.*.rabbit", "lazy.#"];
        assert_eq!(route(&patterns, "quick.orange.rabbit"), vec![0, 1]);
        assert_eq!(route(&patterns, "lazy.orange.elephant"), vec![0, 2]);
        assert_eq!(route(&patterns, "quick.orange.fox"), vec![0]);
        assert_eq!(route(&patterns, "lazy.brown.fox"), vec![2]);
        assert_eq!(route(&patterns, "lazy"), vec![2]);
        assert_eq!(route(&patterns, "quick.brown.fox"), Vec::<usize>::new());
        assert_eq!(route(&patterns, "orange"), Vec::<usize>::new());
        assert_eq!(route(&["#"], ""), vec![0]);
        assert_eq!(route(&["a.#.b"], "a.b"), vec![0]);
        assert_eq!(route(&["a.#.b"], "a.x.y.b"), vec![0]);
        assert_eq!(route(&["#.#"], "a"), vec![0]);
    }

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("*".to_owned()),
            Just("#".to_owned()),
            Just(String::new())
        ]
    }

    proptest! {
        #[test]
        fn trie_equals_reference(
            patterns in proptest::collection::vec(proptest::collection::vec(word(), 1..5), 1..8),
            key in proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c")], 0..6),
        ) {
            let patterns: Vec<String> = patterns.iter().map(|p| p.join(".")).collect();
            let key = key.join(".");
            let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
            let expected: Vec<usize> = patterns
                .iter()
                .enumerate()
                .filter(|(_, p)| pattern_matches(p, &key))
                .map(|(i, _)| i)
                .collect();
            prop_assert_eq!(route(&refs, &key), expected);
        }
    }
}
