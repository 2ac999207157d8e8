"""What each peer has earned: the score book (a pure core) and the file it is kept in.

Every feature that judges peers (averaging, the dataset, state transfer) reports here, so this
package sits below all of them and imports none.
"""
