-- Which deadline ended a model call ('total', 'first_token', 'stall'), in a column of its own;
-- NULL when no deadline fired. Before this, the kind was appended to error_message as text
-- (' [deadline: stall]'): the rows written so are moved over, so that error_message holds the
-- error alone and a question such as "stalls by model" is one WHERE on this column.
ALTER TABLE model_traces ADD COLUMN deadline TEXT
    CHECK (deadline IN ('total', 'first_token', 'stall'));

UPDATE model_traces
SET deadline = 'total',
    error_message = substr(error_message, 1, length(error_message) - length(' [deadline: total]'))
WHERE error_message LIKE '% [deadline: total]';

UPDATE model_traces
SET deadline = 'first_token',
    error_message = substr(error_message, 1,
                           length(error_message) - length(' [deadline: first_token]'))
WHERE error_message LIKE '% [deadline: first!_token]' ESCAPE '!';

UPDATE model_traces
SET deadline = 'stall',
    error_message = substr(error_message, 1, length(error_message) - length(' [deadline: stall]'))
WHERE error_message LIKE '% [deadline: stall]';
